r"""Serving a plastic bundle: a session that holds the Hebbian trace and keeps learning.

    >>> session = PlasticSession("bundle", backend="onnx")
    >>> logits = session.predict(x)            # the trace is read, never moved
    >>> logits = session.step(x, labels)       # predict with the trace, then learn the labelled rows
    >>> session.learn(x, labels)               # the same, logits discarded
    >>> session.hebb                           # float32 (H, C): the state, e.g. to persist
    >>> session.reset()                        # back to the bundle's hebb.npy

Every call goes through the bundle's plastic model (``logits, hebb_out = model(input, labels,
hebb)``, see dhp_deploy/plastic.py): the session passes its trace in and keeps ``hebb_out``. The
trace stays where the model runs between calls — a torch tensor on the session's device, or with
onnxruntime two OrtValues on the device bound with IOBinding and swapped after each call (a
binding copies at bind time) — so a call moves only ``input``, ``labels`` and ``logits`` between
host and device; :attr:`PlasticSession.hebb` copies the trace out when asked. With onnxruntime
the ONNX path imports no torch. ``check()`` replays the bundle's golden stream (calls
of mixed sizes, some rows and one whole call unlabelled) and compares every call's logits and
trace with the eager layer's.

A session may be shared by threads: each call's read-modify-write of the trace runs under the
session's lock, so no update is lost, and concurrent calls take effect in the order they acquire
it (the order is theirs to race for; the serving model is one session per sequence, e.g. per user).
A call that would make the trace non-finite is refused and leaves the trace as it was.
"""

import threading
from pathlib import Path
import numpy as np

from dhp_deploy.bundle import (ATOL, HEBB_FILE, HEBB_NAME, HEBB_OUT_NAME, INPUT_NAME,
                               LABELS_NAME, NO_LABEL, OUTPUT_NAME, PLASTIC_GOLDEN_FILES, RTOL,
                               BundleError)
from dhp_deploy.runtime import (OUTPUTS_REUSED, InputError, check_input, checked_manifest, compare,
                                load_artifact)

__all__ = ["PlasticSession"]


class PlasticSession:
    r"""A plastic bundle opened with one backend; holds the trace between calls.

    ``threads``: intra-op threads of the backend (default 1, for latency: on a shared host more
    threads made the p99 latency jump). onnxruntime takes it per session; torch has one
    intra-op pool per process, so for TorchScript and ``.pt2`` it sets ``torch.set_num_threads``
    process-wide. ``None`` leaves each library's own default (all cores).
    """

    def __init__(self, bundle_dir, backend: str = "torchscript", device: str = "cpu",
                 verify: bool = True, threads: int | None = 1) -> None:
        self.path = Path(bundle_dir)
        self.manifest = checked_manifest(self.path, backend, device, verify, threads,
                                         kind="plastic")
        self.backend, self.device = backend, device
        self.in_features = int(self.manifest["input"]["shape"][1])
        self.num_classes = int(self.manifest["output"]["shape"][1])
        self.initial = _load(self.path / HEBB_FILE)
        loaded = load_artifact(self.path, self.manifest, backend, device, threads)
        self._state = (_OrtState(loaded, device) if backend == "onnx"
                       else _TorchState(loaded, device,
                                        copy_outputs=backend in OUTPUTS_REUSED))
        self._state.load(self.initial)
        # One lock per session: a call's read of the trace, the model run and the write of the
        # new trace form one atomic step (two threads interleaving them lose an update).
        self._lock = threading.Lock()

    @property
    def hebb(self) -> np.ndarray:
        r"""The current trace, float32 ``(H, C)``: a host copy (the state itself stays put)."""
        with self._lock:
            return self._state.read()

    def step(self, x, labels=None, allow_nonfinite: bool = False) -> np.ndarray:
        r"""Logits of ``x`` with the current trace, then the trace learns the labelled rows.

        ``labels`` int64 ``(N,)``: a class id per row or -1 (no label); None = all unlabelled.
        InputError, the trace untouched, if a learning call would make it hold NaN or inf (a
        predict-only call keeps the trace as it was whatever its rows hold).
        """
        x = check_input(x, self.in_features, allow_nonfinite)
        labels = self._check_labels(labels, len(x))
        with self._lock:
            return self._step(x, labels)

    def predict(self, x, allow_nonfinite: bool = False) -> np.ndarray:
        r"""Logits with the current trace; the trace does not move."""
        return self.step(x, None, allow_nonfinite)

    def learn(self, x, labels, allow_nonfinite: bool = False) -> None:
        r"""Move the trace towards the labelled rows of ``x`` (Algorithm 1, one step)."""
        if labels is None:  # step() reads None as "all unlabelled": a learn that learns nothing
            raise InputError("learn needs labels (int64 (N,), -1 = no label for a row); "
                             "use predict to run without learning")
        self.step(x, labels, allow_nonfinite)

    def reset(self) -> None:
        r"""Back to the trace the bundle was exported with."""
        with self._lock:
            self._state.load(self.initial)

    def set_state(self, hebb) -> None:
        r"""Continue from a saved trace (e.g. one persisted from :attr:`hebb`); it must be finite
        (a NaN or inf in the trace makes every later logit NaN)."""
        hebb = np.asarray(hebb)
        if hebb.dtype != np.float32 or hebb.shape != self.initial.shape:
            raise InputError(f"hebb must be float32 {list(self.initial.shape)}, got "
                             f"{hebb.dtype} {list(hebb.shape)}")
        bad = int(np.count_nonzero(~np.isfinite(hebb)))
        if bad:
            raise InputError(f"hebb holds NaN or infinite values in {bad} element(s); a trace "
                             f"must be finite")
        with self._lock:
            self._state.load(np.ascontiguousarray(hebb))

    def check(self, atol: float = ATOL, rtol: float = RTOL) -> dict:
        r"""Replay the golden stream from the exported trace; compare logits and every trace.

        Holds the session's lock for the whole replay: other threads' calls wait, then continue
        from the trace the session had before.
        """
        golden = {key: _load(self.path / name) for key, name in PLASTIC_GOLDEN_FILES.items()}
        with self._lock:
            return self._replay(golden, atol, rtol)

    @staticmethod
    def describe(report: dict) -> str:
        r"""One line of :meth:`check`'s report."""
        return (f"{report['calls']} calls, max_abs_error={report['max_abs_error']:.3e} "
                f"max_trace_error={report['max_trace_error']:.3e} "
                f"argmax_agree={report['argmax_agree']}/{report['rows']} "
                f"unlabelled_call_exact={report['unlabelled_call_exact']}")

    def _step(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        r"""One call, under the lock: run, then keep the new trace only if it is finite."""
        logits = self._state.run(x, labels)
        if self._state.pending_is_finite():
            self._state.commit()
        elif (labels != NO_LABEL).any():
            raise InputError("this call would make the trace NaN or infinite (non-finite or "
                             "extreme inputs); refused, the trace is unchanged")
        # else a predict-only call, whose trace must not move: the model's one-hot class means
        # let a NaN or inf row poison hebb_out even when unlabelled (0 * NaN = NaN), so that
        # hebb_out is dropped and the logits (NaN only in such rows) returned.
        return logits

    def _replay(self, golden: dict, atol: float, rtol: float) -> dict:
        saved = self._state.read()
        self._state.load(self.initial)
        logits, worst_trace, start = [], 0.0, 0
        traces_ok = unlabelled_exact = True
        try:
            for index, size in enumerate(golden["batch_sizes"].tolist()):
                rows = slice(start, start + size)
                before = self._state.read()
                logits.append(self._step(check_input(golden["inputs"][rows], self.in_features),
                                         self._check_labels(golden["labels"][rows], size)))
                trace = self._state.read()
                if (golden["labels"][rows] == NO_LABEL).all():
                    unlabelled_exact &= bool(np.array_equal(trace, before))
                expected = golden["traces"][index]
                worst_trace = max(worst_trace, float(np.abs(trace - expected).max()))
                traces_ok &= bool(np.all(np.abs(trace - expected)
                                         <= atol + rtol * np.abs(expected)))
                start += size
        finally:
            self._state.load(saved)
        report = compare(np.concatenate(logits), golden["logits"], atol, rtol)
        report.update(calls=len(golden["batch_sizes"]), max_trace_error=worst_trace,
                      traces_ok=traces_ok, unlabelled_call_exact=unlabelled_exact)
        report["ok"] = report["ok"] and traces_ok and unlabelled_exact
        return report

    def _check_labels(self, labels, rows: int) -> np.ndarray:
        if labels is None:
            return np.full(rows, NO_LABEL, dtype=np.int64)
        if type(labels).__module__.split(".")[0] == "torch":
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.dtype != np.int64 or labels.shape != (rows,):
            raise InputError(f"labels must be int64 ({rows},), got {labels.dtype} "
                             f"{list(labels.shape)}")
        bad = (labels < NO_LABEL) | (labels >= self.num_classes)
        if bad.any():
            raise InputError(f"labels must be class ids in [0, {self.num_classes}) or {NO_LABEL} "
                             f"(no label); got {int(labels[bad][0])}")
        return np.ascontiguousarray(labels)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} is not a readable .npy ({err})") from None


class _TorchState:
    r"""The trace as a torch tensor on ``device``, fed to ``model`` (TorchScript or .pt2)."""

    def __init__(self, model, device: str, copy_outputs: bool = False) -> None:
        import torch

        self.torch, self.model, self.device = torch, model, device
        # An AOTInductor package may reuse its output buffers on the next call, and returns the
        # trace column-major while it reads its inputs as row-major without checking strides:
        # its outputs are cloned into fresh row-major tensors.
        self.copy_outputs = copy_outputs
        self.hebb = self.pending = None

    def load(self, hebb: np.ndarray) -> None:
        self.hebb = self.torch.from_numpy(hebb.copy()).to(self.device)

    def read(self) -> np.ndarray:
        return self.hebb.cpu().numpy().copy()

    def run(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        r"""Logits of one call; its new trace waits in ``pending`` until :meth:`commit`."""
        torch = self.torch
        with torch.inference_mode():
            logits, hebb = self.model(torch.from_numpy(x).to(self.device),
                                      torch.from_numpy(labels).to(self.device), self.hebb)
            if self.copy_outputs:
                logits = logits.clone(memory_format=torch.contiguous_format)
                hebb = hebb.clone(memory_format=torch.contiguous_format)
        self.pending = hebb
        return logits.cpu().numpy()

    def pending_is_finite(self) -> bool:
        return bool(self.torch.isfinite(self.pending).all())

    def commit(self) -> None:
        self.hebb, self.pending = self.pending, None


class _OrtState:
    r"""The trace in two onnxruntime OrtValues on the session's device, bound with IOBinding: the
    call reads one and writes the other, then they swap. Inputs bind from host memory, the logits
    come back to it."""

    def __init__(self, session, device: str) -> None:
        import onnxruntime as ort

        self.ort, self.session = ort, session
        self.device = device
        self.binding = self.session.io_binding()
        self.buffers = None

    def load(self, hebb: np.ndarray) -> None:
        make = self.ort.OrtValue.ortvalue_from_numpy
        self.buffers = [make(hebb.copy(), self.device, 0), make(hebb.copy(), self.device, 0)]

    def read(self) -> np.ndarray:
        return np.array(self.buffers[0].numpy(), copy=True)

    def run(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        r"""Logits of one call; its new trace waits in the second buffer until :meth:`commit`."""
        binding = self.binding
        binding.bind_cpu_input(INPUT_NAME, x)
        binding.bind_cpu_input(LABELS_NAME, labels)
        binding.bind_ortvalue_input(HEBB_NAME, self.buffers[0])
        binding.bind_output(OUTPUT_NAME, "cpu")  # outputs come back in binding order
        binding.bind_ortvalue_output(HEBB_OUT_NAME, self.buffers[1])
        self.session.run_with_iobinding(binding)
        logits = np.array(binding.get_outputs()[0].numpy(), copy=True)
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        return logits

    def pending_is_finite(self) -> bool:
        # One float64 sum: exact enough for finite fp32 values, NaN/inf propagate.
        return bool(np.isfinite(self.buffers[1].numpy().sum(dtype=np.float64)))

    def commit(self) -> None:
        self.buffers.reverse()  # the written buffer becomes the state; the old one is reused
