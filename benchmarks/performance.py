r"""docs/PERFORMANCE.md: every benchmark script's figures, with the machine and its matmul peak.

    python benchmarks/performance.py [--quick] [--out docs/PERFORMANCE.md]

Runs ``bench_layer.py``, ``bench_data.py``, ``bench_train.py``, ``bench_grid.py``,
``bench_serve.py`` and ``bench_plastic.py`` (those that exist) one after another as
subprocesses and writes one report: a header (CPU, cores, torch, the fp32 matmul peak measured
here, benchmarks/timing.py), the key figures each script reports in its ``--json`` file
(DHP/plain step, loop/vectorised layer, folded/plain inference, runtime latencies and throughputs
side by side, training throughput as % of peak, grid throughput, plastic vs frozen calls), the
reproduce runs' own throughput, then each script's output verbatim. A missing or failing script
is reported, never fatal. ``--quick`` passes each script its smaller-iteration flags (where its
``--help`` lists them): for checking the pipeline, not for publishing numbers.
"""

import argparse
import json
import statistics
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from reproduction.records import machine  # noqa: E402
from timing import describe_peak, matmul_peak, training_flops_per_sample  # noqa: E402

# (script, what it measures, flags for --quick: passed only if the script's --help lists them)
SCRIPTS = (
    ("bench_layer.py", "DHP layer and full training step vs plain",
     {"--iters": "10", "--rounds": "5", "--no-compile": None}),
    ("bench_data.py", "benchmark build time from the MNIST files", {"--only": "split-mnist"}),
    ("bench_train.py", "training protocol wall time and throughput",
     {"--tasks": "2", "--epochs": "1"}),
    ("bench_grid.py", "grid throughput: sequential vs --jobs 2 vs --cohort 8 vs both",
     {"--runs": "4", "--epochs": "1", "--tasks": "2"}),
    ("bench_serve.py", "export/serving: folded vs plain, runtimes vs peak",
     {"--iters": "50", "--repeats": "3", "--rounds": "2", "--peak-size": "1024"}),
    ("bench_plastic.py", "plastic inference: a predict-then-learn call vs the frozen call",
     {"--iters": "50", "--rounds": "3"}),
)


def script_flags(script: Path, quick: dict) -> list[str]:
    r"""The ``--quick`` flags this script's ``--help`` lists (none if --help fails)."""
    try:
        help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                                   text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    flags = []
    for flag, value in quick.items():
        if re.search(rf"{re.escape(flag)}\b", help_text):
            flags += [flag] if value is None else [flag, value]
    return flags


def run_script(script: Path, flags: list[str], timeout: float) -> dict:
    r"""Run one benchmark script in its own process; its key figures come from its ``--json``."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / "figures.json"
        try:
            done = subprocess.run([sys.executable, str(script), *flags, "--json",
                                   str(figures_path)], capture_output=True, text=True,
                                  timeout=timeout, cwd=REPO)
            output, status = done.stdout + (f"\n[stderr]\n{done.stderr}" if done.stderr.strip()
                                            else ""), done.returncode
        except subprocess.TimeoutExpired as err:
            output = err.stdout or ""
            output = output.decode() if isinstance(output, bytes) else output
            status = f"timed out after {timeout:.0f}s"
        figures = (json.loads(figures_path.read_text()) if figures_path.exists()
                   else {"key_lines": [], "data": {}})
    return {"output": output.rstrip(), "status": status, "seconds": time.perf_counter() - start,
            "command": " ".join(["python", str(script.relative_to(REPO)), *flags]),
            "figures": figures}


def reproduce_throughput(peak: float, peak_one: float) -> list[str]:
    r"""Training throughput of the recorded reproduce runs (docs/results) as % of peak."""
    lines = []
    groups = {}
    for path in sorted((REPO / "docs" / "results" / "runs").rglob("*.json")):
        record = json.loads(path.read_text())
        training = record["config"]["training"]
        if tuple(training["hidden"]) != (256, 256) or record.get("diverged"):
            continue  # a diverged run has no finished throughput
        key = (record["benchmark"], record["protocol"], "DHP" if record["dhp"] else "plain",
               record["method"])
        groups.setdefault(key, []).append(record["timings"]["samples_per_s"])
    for (benchmark, protocol, head, method), rates in sorted(groups.items()):
        rate = statistics.median(rates)
        gflops = rate * training_flops_per_sample()["nominal"] / 1e9
        lines.append(f"reproduce {benchmark} ({protocol}) {method} {head}: {rate:,.0f} samples/s "
                     f"≈ "
                     f"{gflops:.1f} GFLOP/s = {100 * gflops / peak_one:.1f}% of the 1-thread "
                     f"peak, {100 * gflops / peak:.1f}% of the machine's (median of {len(rates)})")
    return lines


def gpu_name() -> str:
    # nvidia-smi, not torch.cuda: a CUDA context here would hold GPU memory while the benchmark
    # scripts run.
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        names = []
    names = [name.strip() for name in names if name.strip()]
    return ", ".join(names) if names else "no GPU available to this run"


def render(header: dict, peaks: dict, results: list, quick: bool) -> str:
    peak_one = peaks.get("torch.mm 1 thread")
    peak_one = peak_one if isinstance(peak_one, float) else 0.0
    lines = ["# Performance", "",
             "<!-- generated by benchmarks/performance.py (make bench); do not edit -->", "",
             f"Measured {header['at']} at commit `{header['commit']}`"
             + (" with **--quick** flags (pipeline check, not publishable figures)" if quick
                else "") + ".", "",
             f"- CPU: {header['cpu']}, {header['cores']} logical cores; torch {header['torch']} "
             f"({header['torch_threads']} threads by default), Python {header['python']}",
             "- The machine may be shared with other jobs: read ratios (measured interleaved "
             "within one script) rather than absolute times.",
             f"- {header['peak_size']}³, best of {header['peak_repeats']} "
             f"(benchmarks/timing.py): {describe_peak(peaks)}",
             "- The whole paper grid's time against this host's arithmetic limit: "
             "[GRID_TIME.md](GRID_TIME.md) (benchmarks/grid_time.py, from a timed grid's run "
             "records).",
             f"- GPU: {header['gpu']}; the GPU figures of earlier sittings: "
             "[PERFORMANCE_GPU.md](PERFORMANCE_GPU.md).", "",
             "## Key figures", ""]
    for result in results:
        if result["status"] == "missing":
            continue
        keys = result["figures"]["key_lines"]
        if keys:
            failed = "" if result["status"] == 0 else f"; exit status {result['status']}"
            lines += [f"**{result['script']}** ({result['what']}{failed}):", "", "```", *keys,
                      "```", ""]
    throughput = reproduce_throughput(peaks["peak"], peak_one) if peak_one else []
    if throughput:
        lines += ["**Reproduce runs** (training samples/s from docs/results timings; "
                  f"{training_flops_per_sample()['nominal']:,} FLOP per training sample of the "
                  "784-256-256 MLP; runs "
                  "used 1 thread on a shared machine):", "", "```", *throughput, "```", ""]
    lines += ["## Outputs", ""]
    for result in results:
        lines.append(f"### {result['script']} — {result['what']}")
        lines.append("")
        if result["status"] == "missing":
            lines += ["Not in this checkout (skipped).", ""]
            continue
        status = result["status"]
        lines += [f"`{result['command']}` — exit status {status}, {result['seconds']:.0f} s", "",
                  "```", result["output"] or "(no output)", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    parser.add_argument("--quick", action="store_true", help="small iteration counts")
    parser.add_argument("--only", nargs="+", help="these scripts only (e.g. bench_layer.py)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    size, repeats = (1024, 5) if args.quick else (2048, 7)
    header = {**machine(), "commit": commit, "peak_size": size, "peak_repeats": repeats,
              "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "gpu": gpu_name()}
    print(f"matmul peak ({size}³) ...", file=sys.stderr, flush=True)
    peaks = matmul_peak(size, repeats)
    results = []
    for name, what, quick_flags in SCRIPTS:
        if args.only and name not in args.only:
            continue
        script = HERE / name
        if not script.exists():
            results.append({"script": name, "what": what, "status": "missing"})
            continue
        flags = script_flags(script, quick_flags) if args.quick else []
        print(f"{name} {' '.join(flags)} ...", file=sys.stderr, flush=True)
        results.append({"script": name, "what": what, **run_script(script, flags, args.timeout)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(header, peaks, results, args.quick))
    failed = [r["script"] for r in results if r["status"] not in (0, "missing")]
    print(f"{args.out} written" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
