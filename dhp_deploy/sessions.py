r"""Any bundle opened as the session of its kind: a frozen bundle's
:class:`~dhp_deploy.runtime.Runtime`, a plastic bundle's
:class:`~dhp_deploy.plastic_session.PlasticSession` (the kinds' export side:
:mod:`dhp_deploy.bundle_kinds`). Both open through the one set of checks of
:func:`dhp_deploy.runtime.checked_manifest`, and both answer ``check()`` (their goldens) and
``describe(report)``. Imports no torch: onnxruntime serving stays torch-free.
"""

from pathlib import Path
from typing import Optional, Union

from dhp_deploy.bundle import BundleError, bundle_kind, read_manifest
from dhp_deploy.plastic_session import PlasticSession
from dhp_deploy.runtime import Runtime, artifact_device, open_bundle

__all__ = ["SESSIONS", "open_session", "verify_bundle"]

# Each kind of bundle.BUNDLE_KINDS → how a session of it is opened.
SESSIONS = {"frozen": open_bundle, "plastic": PlasticSession}


def open_session(bundle_dir, backend: str = "torchscript", device: str = "cpu",
                 verify: bool = True,
                 threads: Optional[int] = 1) -> Union[Runtime, PlasticSession]:
    r"""Open the bundle at ``bundle_dir`` with ``backend`` on ``device`` as its kind's session."""
    kind = bundle_kind(read_manifest(Path(bundle_dir), verify=False))
    return SESSIONS[kind](bundle_dir, backend=backend, device=device, verify=verify,
                          threads=threads)


def verify_bundle(bundle_dir, formats) -> None:
    r"""Open each of ``formats`` (on CPU; a ``.pt2`` where it was compiled for) and check it
    against its goldens (a frozen bundle's logits, a plastic bundle's stream of calls);
    BundleError if one fails. What ``dhp-export`` runs before it commits a bundle."""
    manifest = read_manifest(bundle_dir)
    for fmt in formats:
        try:  # threads=None: the exporting process keeps its own thread settings
            session = open_session(bundle_dir, backend=fmt, device=artifact_device(manifest, fmt),
                                   threads=None)
            report = session.check()
        except BundleError as err:
            raise BundleError(f"the {fmt} artifact failed verification: {err}") from None
        if not report["ok"]:
            raise BundleError(f"the {bundle_kind(manifest)} {fmt} artifact does not match its "
                              f"goldens ({session.describe(report)})")
