r"""The Python runtime: open a verified bundle, run it with TorchScript or onnxruntime.

    >>> runtime = open_bundle("export/bundles/split-mnist", backend="onnx", device="cpu")
    >>> out = runtime.predict(pixels)            # float32 [N, 784] in [0, 1]
    >>> out.logits.shape, out.classes, out.labels  # (N, 10), all class ids, argmax class ids
    >>> out = runtime.predict(pixels, task=2)     # task head: columns of classes (4, 5) only

What :func:`open_bundle` checks, each failure a :class:`BundleError` with a one-line message:
the manifest's format name and version, that every file it lists exists and has its sha256, that
the bundle holds the artifact of the requested backend, that the backend's library is installed,
and that the requested device is really used: ``cuda`` needs ``torch.cuda.is_available()`` for
TorchScript and an *active* ``CUDAExecutionProvider`` for onnxruntime (onnxruntime silently falls
back to CPU when CUDA cannot start; we check ``session.get_providers()`` and refuse instead).

What every call checks (:class:`InputError`, a :class:`BundleError`): the input is a float32
array (numpy or CPU torch tensor) of shape ``[N, in_features]`` with N ≥ 1 — no silent casts or
reshapes — and, unless ``allow_nonfinite=True``, holds no NaN or ±inf (a NaN pixel would give NaN
logits and an arbitrary argmax). Values outside [0, 1] are not rejected: they are legal floats,
only out of the training distribution.

Threads: a runtime defaults to one intra-op thread (``threads=1``), the setting for latency
serving. With each library's default (all cores) the batch-1 p99 latency rose to 12–47 ms on a
host shared with other work, against 0.1 ms with one thread: the extra threads spin and wait for
cores. Pass ``threads=N`` for large-batch throughput, ``None`` for the library's default.
onnxruntime takes it per session; torch (TorchScript, ``.pt2``) has one intra-op pool per
process, so there it sets ``torch.set_num_threads`` process-wide.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dhp_deploy.bundle import (ARTIFACT_FILES, ATOL, DEVICES, FORMATS, GOLDEN_FILES, RTOL,
                               BundleError, bundle_kind, read_manifest)

__all__ = ["BundleError", "InputError", "Prediction", "Runtime", "open_bundle", "read_manifest",
           "artifact_device", "ort_session", "compare", "check_input", "load_pt2",
           "checked_manifest", "load_artifact", "LOADERS", "OUTPUTS_REUSED",
           "time_calls", "set_torch_threads", "BACKENDS", "DEVICES"]

BACKENDS = FORMATS


class InputError(BundleError):
    r"""An input the bundle does not accept (shape, dtype, non-finite values, unknown task)."""


@dataclass
class Prediction:
    r"""What :meth:`Runtime.predict` returns.

    Attributes:
        logits: float32 ``(N, K)``; all classes (K = num_classes) without a task, else only the
            task head's classes, in the manifest's order.
        classes: int64 ``(K,)``, the global class id of each column of ``logits``.
        labels: int64 ``(N,)``, the predicted global class id of each row (``classes[argmax]``).
    """

    logits: np.ndarray
    classes: np.ndarray
    labels: np.ndarray


def compare(outputs: np.ndarray, golden: np.ndarray, atol: float = ATOL,
            rtol: float = RTOL) -> dict:
    r"""Errors of ``outputs`` against ``golden`` logits; ``ok`` under numpy.allclose's rule.

    ``max_rel_error`` is max |out − golden| / |golden| over the elements with |golden| ≥
    atol / rtol, where the relative term of the rule dominates (near zero a relative error means
    nothing and the atol term governs), so it is directly comparable with ``rtol``.
    """
    outputs, golden = np.asarray(outputs, np.float64), np.asarray(golden, np.float64)
    if outputs.shape != golden.shape:
        return {"ok": False, "max_abs_error": float("inf"), "max_rel_error": float("inf"),
                "argmax_agree": 0, "rows": len(golden), "reason": f"shape {outputs.shape}"}
    diff = np.abs(outputs - golden)
    big = np.abs(golden) >= (atol / rtol if rtol > 0 else 0.0)
    rel = (diff[big] / np.abs(golden[big])).max() if big.any() else 0.0
    within = bool(np.all(diff <= atol + rtol * np.abs(golden)))  # False on NaN, as it should
    agree = int((outputs.argmax(1) == golden.argmax(1)).sum())
    return {"ok": within and agree == len(golden), "max_abs_error": float(diff.max()),
            "max_rel_error": float(rel), "argmax_agree": agree, "rows": len(golden)}


class Runtime:
    r"""A bundle opened with one backend on one device (made by :func:`open_bundle`).

    Attributes:
        path, manifest, backend, device: as opened.
        in_features, num_classes: the input width and the number of logits.
    """

    def __init__(self, path: Path, manifest: dict, backend: str, device: str,
                 threads: Optional[int] = 1) -> None:
        self.path, self.manifest, self.backend, self.device = path, manifest, backend, device
        self.in_features = int(manifest["input"]["shape"][1])
        self.num_classes = int(manifest["output"]["shape"][1])
        self._heads = {int(h["task_id"]): np.asarray(h["classes"], dtype=np.int64)
                       for h in manifest.get("task_heads") or []}
        loaded = load_artifact(path, manifest, backend, device, threads)
        self._run = (_onnxruntime(loaded, manifest) if backend == "onnx"
                     else _torch_call(loaded, device, copy=backend in OUTPUTS_REUSED))

    @property
    def tasks(self) -> list[int]:
        return sorted(self._heads)

    def task_classes(self, task: int) -> np.ndarray:
        if task not in self._heads:
            known = ", ".join(map(str, self.tasks)) or "none"
            raise InputError(f"unknown task {task!r}; the bundle's task heads are: {known}")
        return self._heads[task]

    def logits(self, x, allow_nonfinite: bool = False) -> np.ndarray:
        r"""Raw logits float32 ``(N, num_classes)`` of pixels ``x`` float32 ``(N, in_features)``."""
        return self._run(check_input(x, self.in_features, allow_nonfinite))

    def run_unchecked(self, x: np.ndarray) -> np.ndarray:
        r"""The backend call alone, without input checks (for timing; prefer :meth:`logits`)."""
        return self._run(x)

    def predict(self, x, task: Optional[int] = None, allow_nonfinite: bool = False) -> Prediction:
        r"""Logits and predicted global class ids; with ``task``, only that task head's classes.

        Without a task the argmax runs over all classes (class- and domain-incremental use);
        with one it runs within the task's classes (task-incremental, multi-head use).
        """
        classes = np.arange(self.num_classes, dtype=np.int64) if task is None \
            else self.task_classes(task)
        logits = self.logits(x, allow_nonfinite)
        if task is not None:
            logits = np.ascontiguousarray(logits[:, classes])
        return Prediction(logits=logits, classes=classes, labels=classes[logits.argmax(1)])

    def golden(self) -> dict:
        r"""The golden arrays of the bundle (inputs, logits, tasks, labels)."""
        out = {}
        for key, name in GOLDEN_FILES.items():
            try:
                out[key] = np.load(self.path / name, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise BundleError(f"{self.path / name} is not a readable .npy ({err})") from None
        return out

    def check(self, atol: float = ATOL, rtol: float = RTOL) -> dict:
        r"""Run the golden inputs as one batch and one row at a time; compare with the goldens.

        Returns :func:`compare`'s report (worst of the two runs) plus ``task_agree``: rows whose
        task-head prediction equals the golden logits' task-head prediction.
        """
        golden = self.golden()
        batched = self.logits(golden["inputs"])
        single = np.concatenate([self.logits(golden["inputs"][i:i + 1])
                                 for i in range(len(golden["inputs"]))])
        reports = [compare(out, golden["logits"], atol, rtol) for out in (batched, single)]
        report = max(reports, key=lambda r: (not r["ok"], r["max_abs_error"]))
        agree = 0
        for row, task in enumerate(golden["tasks"]):
            classes = self._heads.get(int(task), np.arange(self.num_classes))
            agree += int(batched[row, classes].argmax() == golden["logits"][row, classes].argmax())
        report["task_agree"] = agree
        report["ok"] = report["ok"] and agree == len(golden["tasks"])
        report["batch_sizes"] = [len(golden["inputs"]), 1]
        return report

    @staticmethod
    def describe(report: dict) -> str:
        r"""One line of :meth:`check`'s report."""
        rows = report["rows"]
        return (f"max_abs_error={report['max_abs_error']:.3e} "
                f"max_rel_error={report['max_rel_error']:.3e} "
                f"argmax_agree={report['argmax_agree']}/{rows} "
                f"task_head_agree={report['task_agree']}/{rows} batches={report['batch_sizes']}")


def check_input(x, in_features: int, allow_nonfinite: bool = False) -> np.ndarray:
    r"""``x`` as a contiguous float32 ``(N, in_features)`` array, or :class:`InputError` (one line):
    wrong type, dtype or shape, or NaN/inf rows unless ``allow_nonfinite``."""
    if not isinstance(x, np.ndarray):
        # A torch tensor is recognised without importing torch (the onnxruntime path has none).
        if type(x).__module__.split(".")[0] != "torch" or not hasattr(x, "detach"):
            raise InputError(f"input must be a numpy array or torch tensor, "
                             f"got {type(x).__name__}")
        x = x.detach().cpu().numpy()
    if x.dtype != np.float32:
        raise InputError(f"input dtype must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != in_features or x.shape[0] < 1:
        raise InputError(f"input shape must be [N, {in_features}] with N >= 1, "
                         f"got {list(x.shape)}")
    # One float64 sum: exact (finite fp32 values cannot overflow it), NaN/inf propagate.
    if not allow_nonfinite and not np.isfinite(x.sum(dtype=np.float64)):
        bad = int((~np.isfinite(x)).any(1).sum())
        raise InputError(f"input has NaN or infinite values in {bad} row(s); "
                         f"pass allow_nonfinite / --allow-nonfinite to run them anyway")
    return np.ascontiguousarray(x)


def open_bundle(bundle_dir, backend: str = "torchscript", device: str = "cpu",
                verify: bool = True, threads: Optional[int] = 1) -> Runtime:
    r"""Open a bundle with ``backend`` ("torchscript" | "onnx" | "pt2") on ``device`` ("cpu" |
    "cuda"), with ``threads`` intra-op threads (1 by default; see the module's docstring)."""
    bundle_dir = Path(bundle_dir)
    manifest = checked_manifest(bundle_dir, backend, device, verify, threads, kind="frozen")
    return Runtime(bundle_dir, manifest, backend, device, threads)


# What opening a bundle as one kind says when it is the other (sessions.open_session picks right).
_OPENED_AS_OTHER_KIND = {
    "frozen": "is a plastic bundle (its trace is an input); open it with "
              "dhp_deploy.plastic_session.PlasticSession",
    "plastic": "is a frozen bundle (its trace is folded in); a plastic session needs one "
               "exported with dhp-export --plastic",
}


def checked_manifest(bundle_dir: Path, backend: str, device: str, verify: bool,
                     threads: Optional[int], kind: str) -> dict:
    r"""The manifest of a bundle about to be opened, after the checks every way of opening one
    makes (:func:`open_bundle`, the plastic session): a known backend and device, the bundle's
    ``kind`` (one of ``bundle.BUNDLE_KINDS``), its artifact for ``backend``, a valid thread
    count."""
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}, expected one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BundleError(f"unknown device {device!r}, expected one of {', '.join(DEVICES)}")
    manifest = read_manifest(bundle_dir, verify=verify)
    if bundle_kind(manifest) != kind:
        raise BundleError(f"{bundle_dir} {_OPENED_AS_OTHER_KIND[kind]}")
    if backend not in (manifest.get("artifacts") or {}):
        have = ", ".join(manifest.get("artifacts") or {}) or "none"
        raise BundleError(f"{bundle_dir} has no {backend} artifact (it has: {have}); "
                          f"re-export with --format {backend} or all")
    if threads is not None and threads < 1:
        raise BundleError(f"threads must be >= 1 or None, got {threads}")
    return manifest


def load_artifact(bundle_dir: Path, manifest: dict, backend: str, device: str,
                  threads: Optional[int]):
    r"""The bundle's artifact of ``backend`` loaded on ``device``: a TorchScript module, an
    AOTInductor callable or an onnxruntime session, for frozen and plastic bundles alike;
    one-line BundleErrors."""
    if backend != "onnx":
        set_torch_threads(threads)
    return LOADERS[backend](bundle_dir / ARTIFACT_FILES[backend], device, manifest, threads)


def artifact_device(manifest: dict, backend: str) -> str:
    r"""Where ``backend``'s artifact runs by default: a ``.pt2`` on the device it was compiled
    for, everything else on CPU."""
    return (manifest.get("pt2") or {}).get("device", "cpu") if backend == "pt2" else "cpu"


def set_torch_threads(threads: Optional[int]) -> None:
    r"""torch's intra-op threads, process-wide (None: leave them); a no-op when already so (a
    change rebuilds torch's thread pool)."""
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _torchscript(path: Path, device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BundleError("device cuda requested but torch.cuda.is_available() is False "
                          "(no GPU, or a CPU-only torch build)")
    try:
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BundleError(f"{path} is not a loadable TorchScript module ({first[:200]})") \
            from None
    return module.eval()  # a loaded module keeps the training flag it was saved with


def _torch_call(model, device: str, copy: bool):
    r"""numpy in, numpy out through a TorchScript module or an AOTInductor package (``copy``:
    see OUTPUTS_REUSED)."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device))
        out = out.float().cpu().numpy()
        return out.copy() if copy else out

    return run


def load_pt2(path: Path, device: str, manifest: dict):
    r"""An AOTInductor package as a callable on tensors; one-line errors for what cannot load."""
    import torch

    compiled_for = (manifest.get("pt2") or {}).get("device", "cpu")
    if device != compiled_for:
        raise BundleError(f"{path} was compiled for {compiled_for}; re-export on a {device} host "
                          f"to run it there")
    built_with = (manifest.get("pt2") or {}).get("torch")
    if built_with and built_with != torch.__version__:
        raise BundleError(f"{path} was compiled with torch {built_with}; this is torch "
                          f"{torch.__version__} (an AOTInductor package needs the same version)")
    _check_zip(path)
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as err:  # the loader raises RuntimeError and others
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BundleError(f"{path} is not a loadable .pt2 package ({first[:200]})") from None


def _check_zip(path: Path) -> None:
    r"""BundleError unless ``path`` is a complete zip archive (a ``.pt2`` is one). torch's loader
    takes a damaged one for an old format first and logs "Loading outdated pt2 file" before its
    own error, so the damage is named here, on one line, before it is called."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()  # the first member whose CRC does not match, or None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise BundleError(f"{path} is damaged or unreadable (not a complete .pt2 zip archive: "
                          f"{err})") from None
    if broken is not None:
        raise BundleError(f"{path} is damaged (its member {broken} fails its CRC check)")


def ort_session(path: Path, device: str, threads: Optional[int] = 1):
    r"""An onnxruntime session of ``path`` on ``device`` with ``threads`` intra-op threads (None:
    onnxruntime's default, all cores); CUDA must really be active (onnxruntime falls back to CPU
    silently otherwise). One-line BundleErrors."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("backend onnx needs onnxruntime: pip install 'dhp-deploy[onnx]' "
                          "(CPU) or 'dhp-deploy[gpu]' (CUDA)") from None
    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if device == "cuda" and wanted not in ort.get_available_providers():
        raise BundleError("device cuda requested but this onnxruntime has no "
                          "CUDAExecutionProvider (install onnxruntime-gpu: 'dhp-deploy[gpu]')")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; a CUDA start-up failure is checked below
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[wanted])
    except Exception as err:  # onnxruntime raises its own exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BundleError(f"{path} cannot be loaded by onnxruntime ({first[:200]})") from None
    active = session.get_providers()
    if device == "cuda" and (not active or active[0] != wanted):
        raise BundleError(f"device cuda requested but onnxruntime runs on {active} "
                          f"(CUDA could not start; no silent CPU fallback)")
    return session


def _onnxruntime(session, manifest: dict):
    input_name = manifest["input"]["name"]
    output_name = manifest["output"]["name"]

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return run


# The loader of each format of bundle.FORMATS: (artifact path, device, manifest, threads) → the
# loaded artifact. An AOTInductor package may reuse its output buffers on the next call: its
# outputs are copied out before they are returned or kept.
OUTPUTS_REUSED = frozenset({"pt2"})
LOADERS = {"torchscript": lambda path, device, manifest, threads: _torchscript(path, device),
           "onnx": lambda path, device, manifest, threads: ort_session(path, device, threads),
           "pt2": lambda path, device, manifest, threads: load_pt2(path, device, manifest)}


def time_calls(fn, x, iters: int, warmup: int = 5) -> np.ndarray:
    r"""Wall-clock seconds of ``iters`` calls ``fn(x)`` after ``warmup`` untimed ones."""
    import time

    for _ in range(warmup):
        fn(x)
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        fn(x)
        times[i] = time.perf_counter() - start
    return times
