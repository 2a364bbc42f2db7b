r"""Grid throughput: runs per hour of ``reproduce.py grid``, one run at a time vs ``--jobs N``
vs ``--cohort K`` (K runs trained as one vectorised model, dhp_deploy.cohort) vs both
(N processes, each stacking K/N runs).

    python benchmarks/bench_grid.py    # 16 short Split MNIST runs: sequential,
                                       # --jobs 2, --cohort 8, --jobs 2 --cohort 4
    python benchmarks/bench_grid.py --runs 4 --epochs 1 --tasks 2   # a quick look
    python benchmarks/bench_grid.py --device cuda --jobs 1 --cohort 8  # on a GPU

The same runs (Finetune and DHP, seeds 0..) are trained four times into fresh temporary folders,
first sequentially (one process, one thread), then with ``--jobs N`` (N one-thread worker
processes), then in one one-thread process with ``--cohort K`` (Finetune's runs in stacks of K,
DHP's in others), then with both (N one-thread processes, each stacking K/N runs: the stacking
lever with every core busy), and the wall time of each whole grid command is compared. On a
2-core machine the ratio says how much of the second core a grid uses; it needs an idle machine
to mean anything.
Each command pays its start-up once (the workers import torch, ~2 s in all, while the one-process
grid's import is its parent's): with 8 of these 4-second runs that was a tenth of the parallel
wall time, a share a real grid (hundreds of runs of 20 s and more) never sees; 16 runs halve it.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import Figures, matmul_peak

HERE = Path(__file__).resolve().parent


def grid_seconds(jobs: int, cohort: int, args, root: Path) -> float:
    seeds = f"0-{args.runs // 2 - 1}"
    command = [sys.executable, str(HERE / "reproduce.py"), "grid", "--runs", str(root / "runs"),
               "--summaries", str(root / "summaries"), "--benchmarks", "split-mnist",
               "--variants", "finetune,dhp", "--seeds", seeds, "--epochs", str(args.epochs),
               "--num-tasks", str(args.tasks), "--jobs", str(jobs), "--cohort", str(cohort),
               "--device", args.device]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_grid: the grid with --jobs {jobs} --cohort {cohort} failed "
                 f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16, help="runs per grid (even; default 16)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task (default 2)")
    parser.add_argument("--tasks", type=int, default=5, help="Split MNIST tasks (default 5)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs to compare (default 2)")
    parser.add_argument("--cohort", type=int, default=8,
                        help="runs per stack in the cohort grid (default 8; 1: skip it)")
    parser.add_argument("--device", default="cpu", help="where the grids train (default cpu)")
    parser.add_argument("--data-dir", help="default: $DHP_DATA_DIR, else ./data")
    parser.add_argument("--json", help="also write the key figures and numbers here")
    args = parser.parse_args()
    results, figures = {}, Figures()
    # Unmeasured: the first grid of a fresh host paid the disk's and the allocator's first touch
    # (this CPU host: 23 s for a 6 s grid), which would flatter whichever setting comes after.
    with tempfile.TemporaryDirectory() as root:
        grid_seconds(1, 1, argparse.Namespace(**{**vars(args), "runs": 2, "epochs": 1,
                                                 "tasks": 1}), Path(root))
    mixed = max(1, args.cohort // args.jobs)
    settings = {"sequential": (1, 1), f"--jobs {args.jobs}": (args.jobs, 1),
                f"--cohort {args.cohort}": (1, args.cohort),
                f"--jobs {args.jobs} --cohort {mixed}": (args.jobs, mixed)}
    for name, (jobs, cohort) in settings.items():
        if (jobs, cohort) in [tuple(r["setting"]) for r in results.values()]:
            continue  # e.g. --jobs 1 or --cohort 1: a setting already measured
        with tempfile.TemporaryDirectory() as root:
            seconds = grid_seconds(jobs, cohort, args, Path(root))
        results[name] = {"seconds": seconds, "runs_per_hour": args.runs * 3600 / seconds,
                         "setting": (jobs, cohort)}
        figures.key(f"{name}: {args.runs} runs (Split MNIST, {args.tasks} tasks × {args.epochs} "
                    f"epochs, {args.device}) in {seconds:.1f} s = "
                    f"{results[name]['runs_per_hour']:.0f} runs/hour")
    ratios = {name: result["runs_per_hour"] / results["sequential"]["runs_per_hour"]
              for name, result in results.items() if name != "sequential"}
    for name, ratio in ratios.items():
        target = " (target ≥ 1.6 on 2 cores)" if name.startswith("--jobs") else ""
        figures.key(f"{name} / sequential throughput: {ratio:.2f}{target}")
    scaling = None
    if args.device == "cpu":  # the ceiling of --jobs N here: how far the cores' matmuls scale
        rates = matmul_peak(engines=("torch.mm", "torch.mm 1 thread"))
        scaling = rates["torch.mm"] / rates["torch.mm 1 thread"]
        figures.key(f"this host's torch.mm, all cores / one thread: {scaling:.2f} "
                    f"({rates['torch.mm']:.0f} / {rates['torch.mm 1 thread']:.0f} GFLOP/s, "
                    f"measured after the grids): what N one-thread runs can gain at most")
    figures.data = {"results": results, "ratios": ratios, "matmul_scaling": scaling}
    figures.write(args.json)
    return figures.data


if __name__ == "__main__":
    main()
