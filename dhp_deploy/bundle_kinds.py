r"""The two kinds of bundle, each declared once: frozen (the trace folded in) and plastic (the
trace an input and an output, so the served model keeps learning).

A :class:`BundleKind` carries what differs between them on the export side: the module the
formats write (:func:`~dhp_deploy.frozen.fold_model` or
:func:`~dhp_deploy.plastic.plastic_model`), its example inputs, input and output names and
dynamic axes (read by every format's writer, :mod:`dhp_deploy.formats`), its goldens, the state
files it ships and its manifest entries. The exporter (:mod:`dhp_deploy.export`) holds no branch
on the kind; serving opens each kind with its session (``sessions.SESSIONS``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dhp_deploy.bundle import (ATOL, GOLDEN_FILES, HEBB_FILE, HEBB_NAME, HEBB_OUT_NAME,
                               INPUT_NAME, LABELS_NAME, NO_LABEL, OUTPUT_NAME,
                               PLASTIC_GOLDEN_FILES, RTOL, ExportError)
from dhp_deploy.frozen import fold_model
from dhp_deploy.layer import DHPSoftmax
from dhp_deploy.network import DHPNet
from dhp_deploy.plastic import plastic_model, reference_step

__all__ = ["BundleKind", "KINDS", "FROZEN", "PLASTIC", "save_npy"]


@dataclass(frozen=True)
class BundleKind:
    r"""What one kind of bundle is made of (see the module's docstring)."""

    name: str
    served: Callable[[DHPNet], nn.Module]  # the module every format writes
    input_names: tuple
    output_names: tuple
    # (module, device) → (example inputs, torch.export dynamic shapes)
    example: Callable[[nn.Module, str], tuple[tuple, dict]]
    # (bundle dir, model, benchmark, count) → the manifest's "golden" entry
    write_goldens: Callable
    # (bundle dir, model) → None: files besides the artifacts and goldens
    write_state: Callable[[Path, DHPNet], None]
    # model → the manifest's "plastic_io", None for a frozen bundle
    io: Callable[[DHPNet], Optional[dict]]
    head: Callable[[DHPNet], str]  # the manifest's model.head
    needs_dhp_head: bool = False  # a plain head has no trace to keep learning

    def check(self, model: DHPNet, run_dir) -> None:
        r"""An :class:`ExportError` unless ``model`` can be served as this kind."""
        if self.needs_dhp_head and not isinstance(model.head, DHPSoftmax):
            raise ExportError(f"{run_dir}: --plastic needs a run with a DHP head; this one's "
                              f"head is plain (nothing to keep learning)")

    @property
    def onnx_axes(self) -> dict:
        r"""The manifest's ONNX dynamic axes: every input and output but the trace is batched."""
        return {name: {"0": "batch"} for name in (*self.input_names, *self.output_names)
                if name not in (HEBB_NAME, HEBB_OUT_NAME)}


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _golden_rows(benchmark, count: int):
    # Spread the goldens over the tasks: the first ⌈count/T⌉ test images of each task, in order.
    per_task = -(-count // len(benchmark.tasks))
    xs, ys, ts = [], [], []
    for task in benchmark.tasks:
        xs.append(task.x_test[:per_task].cpu())
        ys.append(task.y_test[:per_task].cpu())
        ts.append(torch.full((len(ys[-1]),), task.task_id, dtype=torch.int64))
    return torch.cat(xs)[:count], torch.cat(ys)[:count], torch.cat(ts)[:count]


def _save_goldens(tmp: Path, arrays: dict, files: dict, source: str) -> dict:
    r"""Write ``arrays[key]`` to ``files[key]``; the manifest's ``golden`` entry describing them."""
    golden = {"source": source,
              "tolerance": {"atol": ATOL, "rtol": RTOL, "rule": "|out - golden| <= atol + "
                                                              "rtol * |golden| elementwise"}}
    for key, name in files.items():
        save_npy(tmp / name, arrays[key])
        golden[key] = {"file": name, "dtype": str(arrays[key].dtype),
                       "shape": list(arrays[key].shape)}
    return golden


# ---------------------------------------------------------------------------- frozen

def _frozen_example(module: nn.Module, device: str) -> tuple[tuple, dict]:
    return ((torch.rand(2, module.trunk[0].in_features, device=device),),
            {"x": {0: torch.export.Dim("batch", min=1)}})


def _write_frozen_goldens(tmp: Path, model: DHPNet, benchmark, count: int) -> dict:
    if count < 1:
        raise ExportError(f"golden_count={count}, expected at least 1")
    x, y, tasks = _golden_rows(benchmark, count)
    with torch.no_grad():
        logits = model.eval()(x)  # the eager, unfolded model: θ + α⊙Hebb computed per call
    arrays = {"inputs": x.numpy().astype(np.float32), "logits": logits.numpy().astype(np.float32),
              "tasks": tasks.numpy(), "labels": y.numpy()}
    return _save_goldens(tmp, arrays, GOLDEN_FILES,
                         "eager unfolded model from the checkpoint (eval mode, latest trace), "
                         "real test images of the run's benchmark")


FROZEN = BundleKind(
    name="frozen", served=fold_model, input_names=(INPUT_NAME,), output_names=(OUTPUT_NAME,),
    example=_frozen_example, write_goldens=_write_frozen_goldens,
    write_state=lambda tmp, model: None, io=lambda model: None,
    head=lambda model: "dhp-folded" if isinstance(model.head, DHPSoftmax) else "plain")

# ---------------------------------------------------------------------------- plastic

# The golden stream's batch sizes, repeated until the golden rows run out: batch-1 calls and
# larger ones; labels are the true classes with every third row unlabelled, and one whole batch
# unlabelled (the trace must come back unchanged).
STREAM_BATCH_SIZES = (1, 2, 3, 5, 4)
UNLABELLED_BATCH = 3
MIN_STREAM_ROWS = 60  # 20 calls: a stream long enough for the trace to drift if anything is off


def _plastic_example(module: nn.Module, device: str) -> tuple[tuple, dict]:
    r"""Example inputs of the plastic model (a labelled and an unlabelled row, a zero trace) and
    its dynamic shapes: ``input`` and ``labels`` share the batch axis, ``hebb`` is fixed."""
    batch = torch.export.Dim("batch", min=1)
    example = (torch.rand(2, module.trunk[0].in_features, device=device),
               torch.tensor([0, NO_LABEL], device=device), module.w.new_zeros(module.w.shape))
    return example, {"x": {0: batch}, "labels": {0: batch}, "hebb": None}


def _write_plastic_goldens(tmp: Path, model: DHPNet, benchmark, count: int) -> dict:
    if count < MIN_STREAM_ROWS:
        raise ExportError(f"--golden {count}: a plastic bundle's golden stream needs at least "
                          f"{MIN_STREAM_ROWS} rows (20 calls)")
    x, y, tasks = _golden_rows(benchmark, count)
    labels = y.clone()
    labels[2::3] = NO_LABEL
    sizes, start = [], 0
    while start < len(x):
        sizes.append(min(STREAM_BATCH_SIZES[len(sizes) % len(STREAM_BATCH_SIZES)],
                         len(x) - start))
        start += sizes[-1]
    bounds = np.cumsum([0, *sizes])
    labels[bounds[UNLABELLED_BATCH]:bounds[UNLABELLED_BATCH + 1]] = NO_LABEL
    hebb, logits, traces = model.head.hebb.clone(), [], []
    for low, high in zip(bounds[:-1], bounds[1:]):
        out, hebb = reference_step(model.eval(), x[low:high], labels[low:high], hebb)
        logits.append(out)
        traces.append(hebb)
    arrays = {"inputs": x.numpy().astype(np.float32), "labels": labels.numpy(),
              "tasks": tasks.numpy(), "batch_sizes": np.asarray(sizes, dtype=np.int64),
              "logits": torch.cat(logits).numpy().astype(np.float32),
              "traces": torch.stack(traces).numpy().astype(np.float32)}
    return _save_goldens(tmp, arrays, PLASTIC_GOLDEN_FILES,
                         "a stream of calls through the eager DHP layer (eval-mode logits with "
                         "the trace given, then Algorithm 1 on the labelled rows), starting from "
                         "hebb.npy, on real test images of the run's benchmark")


def _write_initial_trace(tmp: Path, model: DHPNet) -> None:
    save_npy(tmp / HEBB_FILE, model.head.hebb.numpy().astype(np.float32))  # the session's start


def _plastic_io(model: DHPNet) -> dict:
    head = model.head
    shape = [head.in_features, head.out_features]
    return {
        "inputs": [{"name": INPUT_NAME, "dtype": "float32",
                    "shape": ["N", model.trunk[0].in_features]},
                   {"name": LABELS_NAME, "dtype": "int64", "shape": ["N"],
                    "meaning": f"each row's class id, {NO_LABEL} = no label (predict only)"},
                   {"name": HEBB_NAME, "dtype": "float32", "shape": shape,
                    "meaning": "the Hebbian trace to predict with and to update"}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", head.out_features]},
                    {"name": HEBB_OUT_NAME, "dtype": "float32", "shape": shape}],
        "initial_state": {"file": HEBB_FILE, "dtype": "float32", "shape": shape},
        "semantics": "predict, then learn: logits use the trace given in hebb (eval-mode layer); "
                     "hebb_out is that trace after one Algorithm-1 step on the labelled rows "
                     "only: (1 - eta) * hebb[:, c] + eta * mean(h[labels == c]) for each class c "
                     "with a labelled row, every other column unchanged (an all-unlabelled call "
                     "returns hebb bit for bit). theta, alpha, eta and the trunk are frozen.",
        "eta": head.eta.item(),
    }


PLASTIC = BundleKind(
    name="plastic", served=plastic_model, input_names=(INPUT_NAME, LABELS_NAME, HEBB_NAME),
    output_names=(OUTPUT_NAME, HEBB_OUT_NAME), example=_plastic_example,
    write_goldens=_write_plastic_goldens, write_state=_write_initial_trace, io=_plastic_io,
    head=lambda model: "dhp-plastic", needs_dhp_head=True)

KINDS = {kind.name: kind for kind in (FROZEN, PLASTIC)}
