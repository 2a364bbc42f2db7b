r"""What every benchmark script times with: best-of and interleaved-median timers, the fp32 matmul
peak (one definition for all of them), and the FLOPs of a training step.

The peak is the best of ``repeats`` timed products of two ``size``³ fp32 matrices, per engine:
torch.mm (with torch's current threads, and with one thread on CPU), a oneDNN linear on mkldnn
tensors and an onnxruntime MatMul on CPU, torch.mm alone on CUDA (TF32 off, torch's default).
``peak`` names the fastest; a script compares its figure with that, measured in the same run.
"""

import json
import statistics
import time
from typing import Callable, Optional

import torch

# 784-256-256-10, the paper's network: multiply-adds per sample of the forward pass.
MLP_WIDTHS = (784, 256, 256, 10)


def cuda_sync(device) -> Callable[[], None]:
    r"""A no-op on CPU; ``torch.cuda.synchronize`` on CUDA (timings must wait for the kernels)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def best_seconds(function: Callable[[], object], repeats: int, sync=lambda: None,
                 warmup: int = 1) -> float:
    r"""The fastest of ``repeats`` timed calls of ``function`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        function()
    best = float("inf")
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        function()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def median_times(functions: dict, iters: int, rounds: int, sync=lambda: None) -> dict:
    r"""Median seconds per call of each function, timed in interleaved rounds (machine noise
    hits them alike)."""
    samples = {name: [] for name in functions}
    for function in functions.values():  # warm-up
        for _ in range(10):
            function()
    sync()
    for _ in range(rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            for _ in range(iters):
                function()
            sync()
            samples[name].append((time.perf_counter() - started) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def matmul_peak(size: int = 2048, repeats: int = 5, device="cpu",
                engines: Optional[tuple] = None) -> dict:
    r"""``{engine: GFLOP/s, ..., "peak": best GFLOP/s, "peak_engine": its name}``.

    ``engines`` (CPU) picks among "torch.mm", "torch.mm 1 thread", "oneDNN linear" and
    "onnxruntime MatMul" (default all); an engine that cannot run here is reported as a string.
    """
    flop = 2 * size ** 3
    if torch.device(device).type == "cuda":
        a, b = (torch.randn(size, size, device=device) for _ in range(2))
        rates = {"torch.mm": flop / best_seconds(lambda: torch.mm(a, b), repeats,
                                                 torch.cuda.synchronize) / 1e9}
    else:
        rates = _cpu_rates(size, repeats, flop, engines or CPU_ENGINES)
    numbers = {name: rate for name, rate in rates.items() if isinstance(rate, float)}
    best = max(numbers, key=numbers.get)
    return {**rates, "peak": numbers[best], "peak_engine": best}


CPU_ENGINES = ("torch.mm", "torch.mm 1 thread", "oneDNN linear", "onnxruntime MatMul")


def _cpu_rates(size: int, repeats: int, flop: int, engines) -> dict:
    a, b = torch.randn(size, size), torch.randn(size, size)
    makers = {"torch.mm": lambda: (lambda: torch.mm(a, b)),
              "torch.mm 1 thread": lambda: (lambda: torch.mm(a, b)),
              "oneDNN linear": lambda: _onednn_call(a),
              "onnxruntime MatMul": lambda: _onnxruntime_call(a.numpy(), b.numpy())}
    rates, threads = {}, torch.get_num_threads()
    for engine in engines:
        try:
            call = makers[engine]()
            if engine == "torch.mm 1 thread":
                torch.set_num_threads(1)
            with torch.no_grad():
                rates[engine] = flop / best_seconds(call, repeats) / 1e9
        except Exception as err:  # an optional engine: report it, never fail the benchmark
            rates[engine] = f"unavailable ({type(err).__name__}: {str(err)[:80]})"
        finally:
            torch.set_num_threads(threads)
    return rates


def _onednn_call(a: torch.Tensor):
    from torch.utils import mkldnn

    linear = mkldnn.to_mkldnn(torch.nn.Linear(a.shape[0], a.shape[0], bias=False).eval())
    a_dnn = a.to_mkldnn()
    return lambda: linear(a_dnn)


def _onnxruntime_call(a, b):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    size = a.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
    # IR 8: what every onnxruntime since 1.10 reads (onnx writes a newer one by default).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a, "b": b})


def describe_peak(peak: dict) -> str:
    r"""One line: every engine's rate and the peak, e.g. for a script's header."""
    parts = [f"{name} {value:.0f}" if isinstance(value, float) else f"{name} {value}"
             for name, value in peak.items() if name not in ("peak", "peak_engine")]
    return (f"fp32 matmul peak {peak['peak']:.0f} GFLOP/s ({peak['peak_engine']}; "
            + ", ".join(parts) + " GFLOP/s)")


def training_flops_per_sample(widths=MLP_WIDTHS) -> dict:
    r"""A training step's FLOPs per sample: ``nominal`` 3 × the forward's 2·in·out per layer (the
    backward is two matmuls per layer), ``executed`` without the first layer's input gradient."""
    forward = sum(2 * a * b for a, b in zip(widths, widths[1:]))
    return {"forward": forward, "nominal": 3 * forward,
            "executed": 3 * forward - 2 * widths[0] * widths[1]}


class Figures:
    r"""What a benchmark script reports: the lines worth lifting into docs/PERFORMANCE.md
    (:meth:`key` prints each and keeps it) and its numbers (``data``). ``--json PATH`` writes
    both, and benchmarks/performance.py builds its summary from that file, not from the text."""

    def __init__(self) -> None:
        self.key_lines: list[str] = []
        self.data: dict = {}

    def key(self, line: str = "") -> None:
        print(line, flush=True)
        self.key_lines.append(line)

    def write(self, path) -> None:
        if path:
            with open(path, "w") as f:
                json.dump({"key_lines": self.key_lines, "data": self.data}, f, indent=2,
                          default=str)
