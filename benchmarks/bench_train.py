r"""Training throughput on the full Split MNIST protocol, against this machine's fp32 matmul peak.

    python benchmarks/bench_train.py                       # 5 tasks × 10 epochs, batch 64
    python benchmarks/bench_train.py --tasks 2 --epochs 1  # a quick look
    python benchmarks/bench_train.py --threads 1 --threads 2

Variants: finetune (plain head), finetune + DHP, and each regulariser with DHP, trained with the
lean step (``dhp_deploy.lean_step``, what dhp-train uses; ``--steps lean,autograd`` adds the
generic autograd step beside it). The variants train in one process, one epoch of each in turn:
this machine has slow spells of seconds to minutes (one run of finetune + DHP took 16.1 s and, a
minute later, the same run 13.5 s; run after run, DHP / plain read 0.90 to 1.40), and interleaved
epochs share them. For each: wall time (its own start, training, consolidation, evaluation,
checkpoints and metrics files), training samples/s, achieved GFLOP/s and its share of the peak,
the regulariser's training-time overhead over finetune + DHP with the same step, and the final
accuracies; then the ratios DHP / plain and autograd / lean, the targets of the lean step, and
(full protocol on the CPU) one whole ``dhp-train`` process's wall time against the training time
it reports.

FLOP convention (stated in the output): a matmul of (m×k)·(k×n) is 2·m·n·k in the forward pass and
twice that in the backward pass (input gradient + weight gradient), so an MLP 784-256-256-10 costs
3 × 2 × (784·256 + 256·256 + 256·10) = 1.61 MFLOP per training sample ("nominal"). The first layer's
input gradient is never computed (the pixels need none), so "executed" leaves it out (1.21 MFLOP).
Elementwise work (ReLU, the Hebbian update, the optimiser, penalties) is not counted.

Peak (benchmarks/timing.py): the better of a 2048³ fp32 ``torch.mm`` and a oneDNN linear on mkldnn
tensors, best of 5, timed here with the same thread count as the training it is compared with;
on CUDA an 8192³ torch.mm.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dhp_deploy.tasks import build_benchmark
from dhp_deploy.train import TrainConfig, TrainingRun
from timing import Figures, describe_peak, matmul_peak, training_flops_per_sample

VARIANTS = [("finetune", False), ("finetune", True), ("ewc", True), ("online-ewc", True),
            ("si", True), ("mas", True)]
HIDDEN = (256, 256)


def interleaved_runs(variants: list, args) -> list:
    r"""Train every variant ``(method, dhp, step)`` in this process, one epoch of each in turn
    (``TrainingRun.epochs``), so a slow spell of the machine hits them alike; returns one row each.

    A row's wall time is its own start, epochs (training, consolidation, evaluation, checkpoints)
    and metrics files, without the other variants' turns.
    """
    benchmarks, active, rows = {}, [], []
    for method, dhp, step in variants:
        config = TrainConfig(benchmark="split-mnist", method=method, dhp=dhp, epochs=args.epochs,
                             num_tasks=args.tasks, batch_size=args.batch_size, hidden=HIDDEN)
        data = config.data_key()
        if data not in benchmarks:
            benchmarks[data] = build_benchmark(**config.data_arguments(), data_dir=args.data_dir,
                                               device=args.device)
        run_dir = tempfile.TemporaryDirectory()
        started = time.perf_counter()
        run = TrainingRun.start(config, benchmarks[data], run_dir.name, args.device,
                                lean=step != "autograd", cuda_graphs=step == "graphed")
        row = {"method": method, "dhp": dhp, "step": step,
               "wall_s": time.perf_counter() - started}
        active.append((row, run, run.epochs(), run_dir))
        rows.append(row)
    while active:
        for entry in list(active):
            row, run, epochs, run_dir = entry
            started = time.perf_counter()
            if next(epochs, StopIteration) is StopIteration:
                row.update(metrics_row(run.write_metrics()))
                run_dir.cleanup()
                active.remove(entry)
            row["wall_s"] += time.perf_counter() - started
    return rows


def metrics_row(metrics: dict) -> dict:
    timings = metrics["timings"]
    return {"train_s": timings["train_s"], "consolidate_s": timings["consolidate_s"],
            "evaluate_s": timings["evaluate_s"], "samples": timings["samples"],
            "samples_per_s": timings["samples_per_s"], "avg_acc": metrics["avg_acc"][-1],
            "acc": metrics["acc"], "forgetting": metrics["forgetting"]}


def report(threads: int, peak: dict, rows: list, flops: dict, figures: Figures) -> None:
    figures.key(f"== {threads} thread(s): {describe_peak(peak)}")
    figures.key(f"{'variant':<28}{'wall s':>8}{'train s':>9}{'samples/s':>11}{'GFLOP/s':>9}"
                f"{'% peak':>8}"
          f"{'exec GF/s':>10}{'overhead':>9}{'avg acc':>9}")
    for row in rows:
        base = next((r for r in rows if r["method"] == "finetune" and r["dhp"]
                     and r["step"] == row["step"]), None)
        nominal = row["samples_per_s"] * flops["nominal"] / 1e9
        executed = row["samples_per_s"] * flops["executed"] / 1e9
        row.update(gflops=nominal, executed_gflops=executed, percent_of_peak=100 * nominal / peak["peak"])
        overhead = ""
        if base is not None and row["dhp"] and row["method"] != "finetune":
            row["overhead"] = row["train_s"] / base["train_s"] - 1
            overhead = f"{100 * row['overhead']:+.0f}%"
        name = row["method"] + (" + DHP" if row["dhp"] else "") + f" [{row['step']}]"
        figures.key(f"{name:<28}{row['wall_s']:8.1f}{row['train_s']:9.1f}"
                    f"{row['samples_per_s']:11.0f}"
              f"{nominal:9.1f}{row['percent_of_peak']:7.1f}%{executed:10.1f}{overhead:>9}"
              f"{100 * row['avg_acc']:8.2f}%")
    print_ratios(rows, figures)


def print_targets(rows: list, peak: dict, figures: Figures) -> None:
    r"""The issue's targets for the lean step, from this run's rows."""
    lean = {(r["method"], r["dhp"]): r for r in rows if r["step"] == "lean"}
    dhp = lean.get(("finetune", True))
    if dhp is None:
        return
    figures.key(f"finetune + DHP [lean]: {dhp['percent_of_peak']:.0f}% of the {peak['peak']:.0f} "
                f"GFLOP/s peak over training (target >= 50%), {dhp['train_s']:.1f} s of training "
                f"(target <= 10 s on the host where Avalanche took 71.4 s)")
    overheads = {m: r["overhead"] for (m, _), r in lean.items() if "overhead" in r}
    if overheads:
        worst = max(overheads, key=overheads.get)
        figures.key(f"regulariser training time over finetune + DHP [lean]: at most "
                    f"{100 * overheads[worst]:+.0f}% ({worst}; target <= +30%)")


def cli_wall(threads: int, data_dir) -> dict:
    r"""One ``dhp-train`` process on the full protocol (Split MNIST, finetune + DHP): its wall
    time, interpreter start-up and imports included, against the training time it reports."""
    dhp_train = Path(sys.executable).with_name("dhp-train")
    with tempfile.TemporaryDirectory() as run_dir:
        command = [str(dhp_train), "--benchmark", "split-mnist", "--method", "finetune", "--dhp",
                   "--threads", str(threads), "--out", run_dir, "--overwrite"]
        command += ["--data-dir", data_dir] if data_dir else []
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        train = json.loads((Path(run_dir) / "metrics.json").read_text())["timings"]["train_s"]
    return {"wall_s": wall, "train_s": train}


def print_ratios(rows: list, figures: Figures) -> None:
    r"""Training-time ratios measured in this run: DHP / plain per step, autograd / lean."""
    by = {(r["method"], r["dhp"], r["step"]): r["train_s"] for r in rows}
    for step in ("lean", "autograd"):
        if ("finetune", True, step) in by and ("finetune", False, step) in by:
            figures.key(f"DHP / plain training time [{step}]: "
                  f"{by[('finetune', True, step)] / by[('finetune', False, step)]:.2f}")
    for method, dhp, step in by:
        if step == "lean" and (method, dhp, "autograd") in by:
            figures.key(f"autograd / lean [{method}{' + DHP' if dhp else ''}]: "
                  f"{by[(method, dhp, 'autograd')] / by[(method, dhp, 'lean')]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5, help="Split MNIST tasks (max 5)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, action="append",
                        help="torch threads (repeatable; default: torch's current count)")
    parser.add_argument("--methods", nargs="*", help="subset of: " + ", ".join(
        f"{m}{'+dhp' if d else ''}" for m, d in VARIANTS))
    parser.add_argument("--steps", default="lean",
                        help="training steps to compare: lean (default), autograd, "
                             "graphed (the lean step as a CUDA graph, what dhp-train runs on CUDA)")
    parser.add_argument("--data-dir", default=None, help="default: $DHP_DATA_DIR, else ./data")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one pass, no --threads)")
    parser.add_argument("--json", help="also write the key figures and results here")
    args = parser.parse_args()
    flops = training_flops_per_sample((784, *HIDDEN, 10))
    print(f"FLOPs per training sample: nominal {flops['nominal'] / 1e6:.3f} M (forward 2mnk + "
          f"backward 2×2mnk per matmul), executed {flops['executed'] / 1e6:.3f} M (no input "
          f"gradient for the first layer); elementwise work not counted")
    wanted = [(m, d) for m, d in VARIANTS
              if not args.methods or f"{m}{'+dhp' if d else ''}" in args.methods]
    results, figures = [], Figures()
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        peak = (matmul_peak(8192, 5, args.device) if args.device == "cuda" else
                matmul_peak(2048, 5, engines=("torch.mm", "oneDNN linear")))
        rows = interleaved_runs([(method, dhp, step) for step in args.steps.split(",")
                                 for method, dhp in wanted], args)
        report(threads, peak, rows, flops, figures)
        print_targets(rows, peak, figures)
        process = None
        if args.device == "cpu" and args.tasks == 5 and args.epochs == 10:  # the full protocol
            process = cli_wall(threads, args.data_dir)
            figures.key(f"dhp-train --dhp (the whole process): wall {process['wall_s']:.1f} s, "
                        f"training {process['train_s']:.1f} s, wall / training "
                        f"{process['wall_s'] / process['train_s']:.2f} (target <= 1.3)")
        results.append({"threads": threads, "peak": peak, "rows": rows, "process": process})
    figures.data = {"device": args.device, "flops_per_sample": flops, "tasks": args.tasks,
                    "epochs": args.epochs, "batch_size": args.batch_size, "results": results}
    figures.write(args.json)


if __name__ == "__main__":
    main()
