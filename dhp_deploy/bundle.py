r"""The bundle format, shared by the exporter and the runtime: names, version, tolerances,
checksums and manifest reading. Numpy-free and torch-free, so serving imports no training code.

A bundle is a directory: ``manifest.json`` (the format name and version, the model's I/O, the
task heads, the sha256 of every file), the artifacts (``model.ts``, ``model.onnx``, ``model.pt2``)
and golden
vectors (real test images with the eager model's logits). export/README.md documents it.
"""

import hashlib
import json
from pathlib import Path

__all__ = ["BundleError", "ExportError", "BUNDLE_FORMAT", "BUNDLE_VERSION", "MANIFEST_NAME", "INPUT_NAME",
           "OUTPUT_NAME", "FORMATS", "DEVICES", "ARTIFACT_FILES", "GOLDEN_FILES", "ATOL", "RTOL",
           "sha256_file", "read_manifest", "LABELS_NAME", "HEBB_NAME", "HEBB_OUT_NAME", "NO_LABEL",
           "HEBB_FILE", "PLASTIC_GOLDEN_FILES", "BUNDLE_KINDS", "bundle_kind"]

BUNDLE_FORMAT = "dhp-deploy-bundle"
BUNDLE_VERSION = 1
MANIFEST_NAME = "manifest.json"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
FORMATS = ("torchscript", "onnx", "pt2")  # each also a serving backend of the same name
DEVICES = ("cpu", "cuda")  # where a backend may run an artifact
ARTIFACT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}
GOLDEN_FILES = {"inputs": "golden_inputs.npy", "logits": "golden_logits.npy",
                "tasks": "golden_tasks.npy", "labels": "golden_labels.npy"}
# A bundle is frozen (the trace folded in) or plastic (dhp-export --plastic: the trace is explicit
# state, an input and an output); each kind's parts: bundle_kinds.KINDS (export), sessions.SESSIONS
# (serve).
BUNDLE_KINDS = ("frozen", "plastic")
LABELS_NAME, HEBB_NAME, HEBB_OUT_NAME = "labels", "hebb", "hebb_out"
NO_LABEL = -1
HEBB_FILE = "hebb.npy"  # the trace at export: a plastic session's initial state
# Its goldens are a stream of calls: the batches' rows, labels (some -1) and sizes, the logits of
# every row and the trace after every call, all from the eager layer.
PLASTIC_GOLDEN_FILES = {"inputs": "golden_inputs.npy", "labels": "golden_stream_labels.npy",
                        "tasks": "golden_tasks.npy",
                        "batch_sizes": "golden_stream_batch_sizes.npy",
                        "logits": "golden_logits.npy", "traces": "golden_stream_traces.npy"}
# Parity tolerance for fp32 runtimes against the eager goldens, numpy.allclose semantics:
# |runtime − golden| ≤ ATOL + RTOL·|golden| elementwise. Measured errors here are ~1e-6 or less
# (a different GEMM summation order); these bounds leave headroom without hiding a wrong weight.
ATOL, RTOL = 1e-5, 1e-4


class BundleError(Exception):
    r"""A bundle that cannot be used as asked; the message says which file or setting and why."""


class ExportError(Exception):
    r"""An export that cannot be done; the message says what and why (no bundle was written)."""


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir, verify: bool = True) -> dict:
    r"""The manifest of a bundle, after checking its format version and (``verify``) checksums."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"no bundle directory at {bundle_dir}")
    path = bundle_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: not a bundle") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a {BUNDLE_FORMAT} manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{path} has bundle format version {manifest.get('format_version')!r}; "
                          f"this dhp-deploy reads version {BUNDLE_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path} lists no files")
    if verify:
        for name, entry in files.items():
            file = bundle_dir / name
            if Path(name).name != name:
                raise BundleError(f"{path} lists a file outside the bundle: {name!r}")
            if not file.is_file():
                raise BundleError(f"{file} is missing (listed in the manifest)")
            if sha256_file(file) != entry.get("sha256"):
                raise BundleError(f"{file} fails its sha256 check: corrupted or modified")
    return manifest


def bundle_kind(manifest: dict) -> str:
    r"""The kind of the bundle described by ``manifest``, one of :data:`BUNDLE_KINDS`."""
    return "plastic" if manifest.get("plastic") else "frozen"
