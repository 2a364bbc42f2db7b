r"""Serving cost: the folded DHP bundle against a plain MLP, and the runtimes against the matmul peak.

    python benchmarks/bench_serve.py                      # 784-256-256-10, random weights + trace
    python benchmarks/bench_serve.py --run runs/split-dhp # a trained run's network instead

1. Folded vs plain: the DHP network folded as dhp-export does it and a plain-head network of the
   same shape, both exported to TorchScript and ONNX, timed call by call interleaved (batch 1 and
   batch --batch-size); the median over rounds of the folded/plain time ratio is printed against
   the --max-ratio target (1.02). The two graphs are identical in structure (tests/test_export.py),
   so a ratio off 1 is timing noise: it is reported, not turned into an exit status.
2. Runtimes: eager (the unfolded DHPNet, as trained), TorchScript and onnxruntime: batch-1 latency
   p50/p99 and batch --batch-size throughput (best of --repeats), as samples/s and GFLOP/s
   (2·Σ in·out per sample), against this machine's fp32 matmul peak measured here, before and
   after (the faster of torch.mm and an onnxruntime MatMul on --peak-size³, best of 5).

Times are wall clock on whatever else the machine is doing: read the ratios, not the last digit.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dhp_deploy.run_dir import load_model
from dhp_deploy.formats import write_onnx, write_torchscript
from dhp_deploy.frozen import fold_model
from dhp_deploy.network import DHPNet
from dhp_deploy.runtime import time_calls
from timing import Figures, describe_peak, matmul_peak


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def runners(model: DHPNet, directory: Path, name: str) -> dict:
    r"""``{"eager", "torchscript", "onnx"}`` → callable on a float32 numpy batch."""
    frozen = fold_model(model)
    write_torchscript(frozen, directory / f"{name}.ts")
    write_onnx(frozen, directory / f"{name}.onnx")
    scripted = torch.jit.load(str(directory / f"{name}.ts")).eval()
    ort_session = session(directory / f"{name}.onnx")

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def script(x):
        with torch.inference_mode():
            return scripted(torch.from_numpy(x)).numpy()

    def onnx(x):
        return ort_session.run(["logits"], {"input": x})[0]

    return {"eager": eager, "torchscript": script, "onnx": onnx}


def latency_throughput(fn, one, big, iters, repeats) -> tuple[float, float, float]:
    r"""Batch-1 p50/p99 (ms) and the best-of-``repeats`` large-batch rate (samples/s).

    Best-of, like the matmul peak, so the two compare like with like on a shared machine.
    """
    latency = time_calls(fn, one, iters, warmup=20) * 1e3
    seconds = float(np.min(time_calls(fn, big, repeats)))
    return np.percentile(latency, 50), np.percentile(latency, 99), len(big) / seconds


def interleaved_ratio(first, second, x, calls) -> float:
    r"""median(first) / median(second) over calls alternating first, second, first, ...

    Alternating call by call puts both under the same background load, which on a shared
    machine moves far more than the difference being measured.
    """
    for _ in range(3):
        first(x), second(x)
    a, b = np.empty(calls), np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        first(x)
        middle = time.perf_counter()
        second(x)
        a[i], b[i] = middle - start, time.perf_counter() - middle
    return float(np.median(a) / np.median(b))


def folded_vs_plain(folded: dict, plain: dict, one, big, rounds, iters, repeats) -> dict:
    r"""Median over rounds of the interleaved folded/plain time ratio, batch 1 and large batch.

    Each round alternates which network goes first, so call order cannot favour either.
    """
    ratios = {}
    for backend in ("torchscript", "onnx"):
        f, p = folded[backend], plain[backend]
        small, large = [], []
        for r in range(rounds):
            if r % 2 == 0:
                small.append(interleaved_ratio(f, p, one, iters))
                large.append(interleaved_ratio(f, p, big, repeats))
            else:
                small.append(1 / interleaved_ratio(p, f, one, iters))
                large.append(1 / interleaved_ratio(p, f, big, repeats))
        ratios[backend] = {"batch 1 p50": statistics.median(small),
                           f"batch {len(big)}": statistics.median(large)}
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="trained run directory (default: random weights)")
    parser.add_argument("--hidden", default="256,256", help="hidden widths without --run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=300, help="batch-1 calls per measurement")
    parser.add_argument("--repeats", type=int, default=15, help="large-batch calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved folded/plain rounds")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--max-ratio", type=float, default=1.02)
    parser.add_argument("--json", help="also write the key figures and numbers here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.run:
        model, _ = load_model(args.run)
    else:
        model = DHPNet(hidden=tuple(int(w) for w in args.hidden.split(",")), dhp=True).eval()
        with torch.no_grad():  # a trained-looking trace, so the fold has something to fold
            model.head.hebb.uniform_(0, 1)
    hidden = [m.out_features for m in model.trunk if isinstance(m, torch.nn.Linear)]
    plain = DHPNet(model.trunk[0].in_features, model.head.out_features if model.dhp
                   else model.head.linear.out_features, hidden=hidden, dhp=False).eval()
    widths = [model.trunk[0].in_features, *hidden, plain.head.linear.out_features]
    flops = 2 * sum(a * b for a, b in zip(widths, widths[1:]))
    print(f"network {'-'.join(map(str, widths))} ({flops:,} FLOP/sample), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")

    rng = np.random.default_rng(0)
    big = rng.random((args.batch_size, widths[0]), dtype=np.float32)
    one = np.ascontiguousarray(big[:1])
    with tempfile.TemporaryDirectory() as tmp:
        folded_run = runners(model, Path(tmp), "folded")
        plain_run = runners(plain, Path(tmp), "plain")

        engines = ("torch.mm", "onnxruntime MatMul")
        before = matmul_peak(args.peak_size, 5, engines=engines)
        rows = []
        for name, fn in folded_run.items():
            label = "eager (unfolded DHP)" if name == "eager" else f"{name} (folded)"
            rows.append((label, *latency_throughput(fn, one, big, args.iters, args.repeats)))
        after = matmul_peak(args.peak_size, 5, engines=engines)  # before and after: load moves
        peak = before if before["peak"] >= after["peak"] else after
        figures = Figures()
        figures.key(f"{args.peak_size}³, best of 5, before and after: {describe_peak(peak)}")
        figures.key(f"{'runtime':<22}{'p50 ms':>9}{'p99 ms':>9}{'samples/s':>13}{'GFLOP/s':>9}"
                    f"{'% peak':>8}   (batch 1 latency; batch {args.batch_size} best-of "
                    f"throughput)")
        for label, p50, p99, rate in rows:
            gflops = rate * flops / 1e9
            figures.key(f"{label:<22}{p50:>9.3f}{p99:>9.3f}{rate:>13,.0f}{gflops:>9.1f}"
                        f"{100 * gflops / peak['peak']:>7.1f}%")
        eager = rows[0]
        for label, p50, _, rate in rows[1:]:
            figures.key(f"{label}: batch-1 p50 {p50 / eager[1]:.2f}× eager's, throughput "
                        f"{rate / eager[3]:.2f}× eager's")
        ratios = folded_vs_plain(folded_run, plain_run, one, big, args.rounds, args.iters,
                                 args.repeats)
    worst = max(r for backend in ratios.values() for r in backend.values())
    figures.key(f"folded DHP / plain MLP time (calls interleaved; median of {args.rounds} "
                f"rounds):")
    for backend, values in ratios.items():
        figures.key(f"  {backend:<12}" + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    verdict = "within" if worst <= args.max_ratio else "over"
    figures.key(f"worst ratio {worst:.3f} ({verdict} the {args.max_ratio} target)")
    figures.data = {"peak": peak, "rows": [dict(zip(("runtime", "p50_ms", "p99_ms",
                                                     "samples_per_s"), row)) for row in rows],
                    "folded_over_plain": ratios, "flop_per_sample": flops}
    figures.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
