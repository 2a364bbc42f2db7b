r"""Export bundles: a trained run's served model (frozen or plastic, :mod:`dhp_deploy.bundle_kinds`)
in every format, with goldens and a manifest.

A bundle is one directory, written whole or not at all (built in a temporary directory beside the
target, renamed into place at the end)::

    BUNDLE/
      manifest.json        what the bundle holds, how to feed it, sha256 of every other file
      model.ts             torch.jit.script of the folded eval model (Python and LibTorch)
      model.onnx           torch.onnx.export(dynamo=True) of the same model, one file
      model.pt2            torch.export + AOTInductor: the same model compiled for this CPU
                           (or this host's GPU: pt2_device="cuda")
      golden_inputs.npy    float32 [G, 784] real test images of the run's benchmark
      golden_logits.npy    float32 [G, C]  the eager (unfolded, from checkpoint) model's logits
      golden_tasks.npy     int64 [G]       the task each golden image was drawn from
      golden_labels.npy    int64 [G]       its true global class id

The frozen model folds the trace into the head (:mod:`dhp_deploy.frozen`); a plastic bundle
(``plastic=True``) serves the trace as an input and an output, ships ``hebb.npy`` and a golden
stream instead (:mod:`dhp_deploy.plastic`). The full format is documented in ``export/README.md``.
"""

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dhp_deploy.bundle import (ARTIFACT_FILES, ATOL, BUNDLE_FORMAT, BUNDLE_VERSION, FORMATS,
                               ExportError, GOLDEN_FILES, INPUT_NAME, MANIFEST_NAME, OUTPUT_NAME,
                               RTOL, sha256_file)
from dhp_deploy.bundle_kinds import KINDS, BundleKind
from dhp_deploy.config import TrainConfig, model_arguments
from dhp_deploy.formats import WRITERS
from dhp_deploy.frozen import FrozenMLP, fold_model
from dhp_deploy.io import commit_directory, make_sibling_dir
from dhp_deploy.network import DHPNet, predicted_classes
from dhp_deploy.run_dir import METRICS_NAME, CheckpointError, load_model
from dhp_deploy.triton_repository import is_repository

__all__ = ["ExportError", "export_run", "benchmark_of_run", "evaluate_accuracy", "sha256_file",
           "BUNDLE_FORMAT", "BUNDLE_VERSION", "FORMATS", "ATOL", "RTOL", "INPUT_NAME",
           "OUTPUT_NAME", "MANIFEST_NAME", "GOLDEN_FILES", "ARTIFACT_FILES"]

def benchmark_of_run(payload: dict, data_dir=None):
    r"""Rebuild the run's benchmark (same test sets) from the training config of its checkpoint."""
    from dhp_deploy.tasks import build_benchmark
    from dhp_deploy.data import DataError

    kwargs = _data_arguments(payload.get("config", {}))
    name = kwargs.pop("name")
    kwargs["download"] = False
    try:
        return build_benchmark(name, data_dir, device="cpu", **kwargs)
    except DataError as err:
        raise ExportError(f"cannot rebuild the run's test data: {err}") from None
    except TypeError as err:
        raise ExportError(f"the checkpoint's data settings do not fit build_benchmark: {err}") \
            from None


def _data_arguments(config: dict) -> dict:
    r"""``build_benchmark``'s arguments of a run config (:meth:`TrainConfig.data_arguments`)."""
    try:
        return TrainConfig.from_json(config).data_arguments()
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"the checkpoint holds no usable training config ({err})") from None


def evaluate_accuracy(predict_logits, benchmark) -> list[tuple[int, int]]:
    r"""``(correct, total)`` per task on the test sets, as the training run evaluates.

    ``predict_logits(x) -> logits`` (numpy or torch, ``(N, num_classes)``). Scenario "task":
    argmax within the task's classes; "class" / "domain": argmax over all classes.
    """
    counts = []
    for task in benchmark.tasks:
        logits = torch.as_tensor(np.asarray(predict_logits(task.x_test)))
        classes = (torch.tensor(task.classes, dtype=torch.int64)
                   if benchmark.scenario == "task" else None)
        predicted = predicted_classes(logits, classes)
        counts.append((int((predicted == task.y_test.cpu()).sum()), len(task.y_test)))
    return counts


def _versions() -> dict:
    import dhp_deploy

    versions = {"dhp_deploy": dhp_deploy.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "python": platform.python_version()}
    for name in ("onnx", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _read_metrics(run_dir: Path, payload: dict) -> dict:
    path = run_dir / METRICS_NAME
    if path.is_file():
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"{path} is not readable JSON ({err})") from None
    else:
        metrics = payload.get("metrics") or {}
    keys = ("acc", "avg_acc", "bwt", "forgetting", "acc_matrix")
    return {key: metrics.get(key) for key in keys}


def _manifest(model: DHPNet, frozen: FrozenMLP, payload: dict, metrics: dict, formats,
              golden: dict, sections: dict, kind: BundleKind) -> dict:
    r"""The bundle's manifest (``sections``: what each format's writer recorded)."""
    plastic_io = kind.io(model)
    config = payload["config"]  # load_checkpoint guarantees it, in the current layout
    model_config = model_arguments(config)
    bench = payload.get("benchmark", {})
    linears = [m for m in frozen.modules() if isinstance(m, nn.Linear)]
    in_features = linears[0].in_features
    num_classes = linears[-1].out_features
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "versions": _versions(),
        "model": {
            "architecture": "mlp",
            "in_features": in_features,
            "hidden": [m.out_features for m in linears[:-1]],
            "num_classes": num_classes,
            "head": kind.head(model),
            "folding": "head weight = (w + alpha * hebb)^T with the latest trace (DHP), or the "
                       "plain head's weight; bias-free",
            "parameters": sum(p.numel() for p in frozen.parameters()),
            "flops_per_sample": 2 * sum(m.in_features * m.out_features for m in linears),
            "config": model_config,
        },
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", in_features],
                  "range": [0.0, 1.0],
                  "layout": "28x28 grey pixels flattened row-major, value = byte / 255; for "
                            "permuted benchmarks, in the task's pixel order",
                  "preprocessing": "none outside the graph"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", num_classes]},
        "classes": list(range(num_classes)),
        "scenario": bench.get("scenario"),
        "task_heads": [{"task_id": int(t["task_id"]), "classes": [int(c) for c in t["classes"]]}
                       for t in bench.get("tasks", [])],
        "training": {"benchmark": bench.get("name"), "method": config["training"]["method"],
                     "seed": config["training"]["seed"], "dhp": bool(model_config.get("dhp")),
                     "data": _data_arguments(config),
                     "position": payload.get("position")},
        "metrics": metrics,
        "artifacts": {fmt: ARTIFACT_FILES[fmt] for fmt in formats},
        # What each format's writer recorded (onnx: opset, IR version; pt2: device, torch),
        # null where that format was not written.
        **{fmt: sections.get(fmt) for fmt in FORMATS if fmt != "torchscript"},
        "golden": golden,
        "plastic": plastic_io is not None,
        **({"plastic_io": plastic_io} if plastic_io else {}),
        "files": {},
    }


def export_run(run_dir, out_dir, formats: Sequence[str] = FORMATS, *, overwrite: bool = False,
               golden_count: int = 64, data_dir=None, allow_unfinished: bool = False,
               plastic: bool = False, verify: Optional[Callable] = None,
               pt2_device: str = "cpu", _before_commit=None) -> Path:
    r"""Export the trained model of ``run_dir`` as a bundle at ``out_dir``; returns its path.

    Args:
        run_dir: a training run directory (``checkpoint.pt``, ``metrics.json``).
        out_dir: the bundle directory to create; must not exist unless ``overwrite``.
        formats: any of :data:`~dhp_deploy.bundle.FORMATS` (torchscript, onnx, pt2).
        golden_count: how many real test images to store as golden vectors.
        data_dir: MNIST root to rebuild the test sets (None → ``$DHP_DATA_DIR`` → ``./data``).
        allow_unfinished: export a run whose training has not finished.
        plastic: export the plastic model (:mod:`dhp_deploy.plastic`: the trace is an input
            and an output, ``hebb.npy`` the initial state) instead of the folded frozen one.
        verify: called as ``verify(bundle_dir, formats)`` on the complete temporary bundle
            before it is committed; whatever it raises stops the export and nothing is written.
            ``dhp-export`` passes :func:`dhp_deploy.sessions.verify_bundle` (every artifact loaded
            and checked against the goldens); the exporter itself knows nothing of runtimes.
        pt2_device: ``"cpu"`` or ``"cuda"``: the device the ``.pt2`` package is compiled for.

    Raises:
        ExportError: nothing was written at ``out_dir``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown format(s) {unknown}, expected some of {', '.join(FORMATS)}")
    check_replaceable(out_dir, run_dir, overwrite)
    try:
        model, payload = load_model(run_dir)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if not (payload.get("position") or {}).get("finished") and not allow_unfinished:
        raise ExportError(f"{run_dir}: training has not finished (pass --allow-unfinished to "
                          f"export the latest checkpoint anyway)")
    kind = KINDS["plastic" if plastic else "frozen"]
    kind.check(model, run_dir)
    metrics = _read_metrics(run_dir, payload)
    benchmark = benchmark_of_run(payload, data_dir)
    frozen = fold_model(model)  # its shapes describe the model in every manifest
    served = kind.served(model)

    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = make_sibling_dir(out_dir)
    except OSError as err:
        raise ExportError(f"cannot create the bundle beside {out_dir}: {err.strerror or err}") \
            from None
    try:
        golden = kind.write_goldens(tmp, model, benchmark, golden_count)
        sections = {fmt: WRITERS[fmt](served, tmp / ARTIFACT_FILES[fmt], kind, pt2_device)
                    for fmt in formats}
        kind.write_state(tmp, model)
        manifest = _manifest(model, frozen, payload, metrics, formats, golden, sections, kind)
        for path in sorted(tmp.iterdir()):
            manifest["files"][path.name] = {"sha256": sha256_file(path),
                                            "bytes": path.stat().st_size}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify is not None:
            try:
                verify(tmp, formats)
            except Exception as err:  # whatever the checker raises: the bundle is not written
                raise ExportError(f"the bundle failed verification: {err}") from None
        if _before_commit is not None:  # test hook: a failure at the last possible moment
            _before_commit(tmp)
        _commit(tmp, out_dir, overwrite)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (ExportError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(err, OSError):
            raise ExportError(f"writing the bundle failed: {err}") from None
        raise
    return out_dir


def check_replaceable(out_dir: Path, run_dir: Path, overwrite: bool) -> None:
    r"""An :class:`ExportError` unless an export may be written at ``out_dir``: nothing there, or
    with ``overwrite`` an empty folder or an earlier export (a bundle, a Triton repository) that
    does not hold the run. ``--overwrite`` replaces what dhp-export wrote, never a run directory
    or a folder of other files (it would delete them)."""
    out_dir, run = Path(out_dir), Path(run_dir).resolve()
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists (pass overwrite / --overwrite to replace it)")
    if out_dir.resolve() == run or out_dir.resolve() in run.parents:
        raise ExportError(f"{out_dir} holds the run being exported ({run_dir}); not replacing it "
                          f"(choose another --out)")
    earlier_export = (out_dir / MANIFEST_NAME).exists() or is_repository(out_dir)
    if (out_dir.is_dir() and not out_dir.is_symlink() and any(out_dir.iterdir())
            and not earlier_export):
        raise ExportError(f"{out_dir} is not an earlier export (no {MANIFEST_NAME}, not a Triton "
                          f"repository): --overwrite replaces only those, not other folders")


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    r"""Rename the finished ``tmp`` into place as ``out_dir`` (:func:`commit_directory`); an
    :class:`ExportError` when ``out_dir`` is in the way."""
    try:
        commit_directory(tmp, out_dir, overwrite=overwrite)
    except FileExistsError:
        raise ExportError(f"{out_dir} already exists (pass overwrite / --overwrite to replace "
                          f"it)") from None
    except NotADirectoryError:
        raise ExportError(f"{out_dir} exists and is not a bundle directory; not replacing it") \
            from None
