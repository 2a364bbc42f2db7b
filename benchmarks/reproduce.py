r"""Reproduce the DHP paper's table: 5 methods × {plain head, DHP head} × benchmarks × seeds.

Three steps, each resumable (run it again after an interruption; nothing finished is redone):

    python benchmarks/reproduce.py search   # regularisation strengths on a validation split
    python benchmarks/reproduce.py grid     # the table's runs with the chosen strengths
    python benchmarks/reproduce.py trace    # the trace study (DHP on a shared head, interventions)
    python benchmarks/results.py --from docs/results --out docs/RESULTS.md

``search`` trains each regulariser (plain head) with a few strengths on one benchmark
(``--benchmark``, default split-mnist) with ``val_fraction`` of every task's training set held
out, ranks them by the final average accuracy on those *validation* sets (test data is never
looked at; a best value at the edge is extended a decade past it, and a method whose every value
diverged goes a decade below its weakest), and writes the winners to
``docs/results/strengths.json``. ``grid`` trains every (benchmark, variant, seed) on the full
training sets with those strengths, the same strength for X and DHP+X, so DHP's gain is the
head's; a benchmark without a search of its own borrows the closest searched one's strengths.
A run whose loss or weights stop being finite is a result too: ``diverged.json`` records it, the
search ranks that strength last, and it is not retried.

The grid's rows (``--variants``): ``paper``, the ten variants of the paper's table, and
``ablation``, each of them with the other head's θ initialisation (``dhp@linear``: a DHP head with
``nn.Linear``'s init; ``finetune@authors``: a plain head with the authors' init), which separates
what the initialisation and what plasticity contribute to DHP's gain; ``all`` both. Without
``--variants`` the grid is the one docs/RESULTS.md reports: ``all`` on Split MNIST, the paper's
and the Finetune/SI ablation on the permuted benchmarks.

Trainings run through the training API (``dhp_deploy.train.TrainingRun``, the code behind
``dhp-train``), in this process or, with ``--jobs N``, in N one-thread worker processes that
take the next run as they finish (a progress line per run: runs done / total, ETA); the
benchmark's data is built once per (benchmark, seed) per process. On a GPU, ``--cohort K`` trains
up to K runs that differ only in seed, method or strength (a grid cell's seeds, a search's
strengths) at once as one vectorised model (``dhp_deploy.cohort``); each keeps its own run
directory and resumes alone or in a cohort, and equals the run trained alone to float rounding
(not bit for bit: batched matmuls sum in another order). A run whose summary is already
recorded under ``SUMMARIES/`` with the same settings is not redone (the run directories of a
committed record may live on another machine). Every run has
its own ``dhp-train`` run directory (``config.json``, ``checkpoint.pt`` after every epoch,
``metrics.json`` when finished) under ``RUNS/<benchmark>/<protocol>/<variant>/seed<k>``, where
``<protocol>`` is ``paper`` for the paper's settings or names what differs (``e2`` = 2 epochs per
task). A run directory with ``metrics.json`` is finished and skipped; one with only a checkpoint
is resumed from its last epoch, bit for bit (the same as ``dhp-train --resume DIR``). Each
finished run leaves a small JSON summary (config, seed, commit, metrics, timings) under
``SUMMARIES/`` — the record every number of docs/RESULTS.md comes from. Protocol options
(``--epochs``, ``--train-limit``, ...) make a reduced grid, kept apart by its ``<protocol>`` name.
Training uses one CPU thread by default (``--threads``): batch-64 steps gain little from more, and
on a shared machine oversubscribed threads were 10-100× slower here.
"""

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkout.py beside us
import checkout  # noqa: E402,F401  (this checkout's dhp_deploy, then the reproduction package)
from dhp_deploy.regularizers import STRENGTH_OPTION  # noqa: E402
from dhp_deploy.run_dir import CHECKPOINT_NAME, METRICS_NAME  # noqa: E402
from reproduction.jobs import (MAX_EXTENSIONS, SEARCH_SEED, SEARCH_VALUES,  # noqa: E402
                               all_diverged, choose_strengths, grid_jobs, search_jobs)
from reproduction.naming import (PAPER_BENCHMARKS, TRACE_BENCHMARKS, TRACE_SEEDS,  # noqa: E402
                                 DHP_STRENGTH, INTERVENTIONS, SUFFIXES, TRACE_VARIANTS,
                                 VARIANT_GROUPS, train_command)
from dhp_deploy.metrics import format_duration  # noqa: E402
from reproduction.estimates import commit_ages, job_estimates, record_folders  # noqa: E402
from reproduction.records import REPO, machine  # noqa: E402
from reproduction.runs import (RUN_STATUS, ConfigMismatch, auto_setting, execute,  # noqa: E402
                              recorded_result)

COMMITTED_SUMMARIES = REPO / "docs" / "results"  # the records this repository ships


# --------------------------------------------------------------------------- command line


def _seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def _count_or_auto(text: str):
    return "auto" if text == "auto" else _count(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _names(choices):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; expected some of "
                                             f"{', '.join(choices)}")
        return names
    return parse


def _known_variant(name: str) -> bool:
    r"""A variant of the grid with suffixes (``si~fixed-perms``); the interventions (on the trace)
    only on a DHP head."""
    base, *suffixes = name.split("~")
    if DHP_STRENGTH in suffixes and not base.startswith("dhp+"):
        return False  # a strength searched on the DHP network: DHP with a regulariser only
    return (base in VARIANT_GROUPS["all"]
            and all(suffix in SUFFIXES or suffix == DHP_STRENGTH for suffix in suffixes)
            and (base.startswith("dhp") or not set(suffixes) & set(INTERVENTIONS)))


def _variants(text: str) -> list[str]:
    names = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name in VARIANT_GROUPS:
            names += VARIANT_GROUPS[name]
        elif _known_variant(name):
            names.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown variant {name}; expected a group ({', '.join(VARIANT_GROUPS)}) or "
                f"some of {', '.join(VARIANT_GROUPS['all'])}")
    return list(dict.fromkeys(names))


def parse_arguments(argv=None):
    from dhp_deploy.tasks import BENCHMARKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("search", "grid", "trace"),
                        help="search strengths, run the grid, or run the trace study (DHP on "
                             "a shared head with its trace diagnostics, plain partners and the "
                             "interventions: permuted-mnist, seeds 0-9 by default)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "reproduce",
                        help="root of the run directories (default runs/reproduce)")
    parser.add_argument("--summaries", type=Path, default=COMMITTED_SUMMARIES,
                        help="where run summaries and strengths.json go (default docs/results)")
    parser.add_argument("--strengths", type=Path, help="chosen strengths JSON "
                        "(default SUMMARIES/strengths.json)")
    parser.add_argument("--benchmarks", type=_names(BENCHMARKS),
                        help="grid: comma-separated benchmarks (default the paper's three; "
                             "trace: permuted-mnist)")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="split-mnist",
                        help="search: the benchmark to tune on (default split-mnist)")
    parser.add_argument("--variants", type=_variants, default=None,
                        help="grid: comma-separated variants or groups: paper (the ten of the "
                             "paper's table), ablation (each with the other head's θ init, e.g. "
                             "dhp@linear, finetune@authors), all (default: the grid "
                             "docs/RESULTS.md reports — all on split-mnist, the paper's and "
                             "the Finetune/SI ablation on the permuted benchmarks)")
    parser.add_argument("--dhp", action="store_true",
                        help="search: tune on the DHP network (strengths stored as "
                             "BENCHMARK+dhp, which no grid reads: a study of whether the plain "
                             "head's strengths suit DHP)")
    parser.add_argument("--methods", type=_names(tuple(SEARCH_VALUES)),
                        help="search: regularisers to tune (default all four)")
    parser.add_argument("--seeds", type=_seeds,
                        help="grid: seeds, e.g. 0-4 or 0,2 (default 0-4; trace: 0-9)")
    parser.add_argument("--seed", type=int, default=SEARCH_SEED,
                        help=f"search: the one seed (default {SEARCH_SEED})")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="held-out share of each task's training set (default: search 0.1, "
                             "grid 0 — the grid trains on all training data)")
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("num-tasks", int),
                       ("train-limit", int), ("test-limit", int), ("fisher-samples", int)):
        parser.add_argument(f"--{name}", type=kind, help="protocol override (default: the paper's)")
    parser.add_argument("--hidden", type=lambda text: tuple(int(w) for w in text.split(",")),
                        help="hidden widths, e.g. 256,256 (default the paper's)")
    parser.add_argument("--data-dir", default=os.environ.get("DHP_DATA_DIR"),
                        help="MNIST root (default $DHP_DATA_DIR, else ./data)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: batch-64 steps gain little from more, "
                             "and on a busy machine extra threads stall each other)")
    parser.add_argument("--jobs", type=_count_or_auto, default="auto",
                        help="runs trained at once, each a one-thread process (default auto: "
                             "one per core the memory allows on a CPU, 1 on a GPU)")
    parser.add_argument("--cohort", type=_count_or_auto, default="auto", metavar="K",
                        help="train up to K runs that differ only in seed, method or strength "
                             "at once, as one vectorised model (dhp_deploy.cohort): the way a GPU "
                             "pays off; runs of one seed share their data (default auto: 10 on "
                             "a GPU, 1 on a CPU, where stacking measured slower)")
    parser.add_argument("--stop-after", type=float, metavar="MINUTES",
                        help="start no new run after this many minutes (resume later)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    args = parser.parse_args(argv)
    if args.val_fraction is None:
        args.val_fraction = 0.1 if args.step == "search" else 0.0
    if args.strengths is None:
        args.strengths = args.summaries / "strengths.json"
    trace = args.step == "trace"
    if args.benchmarks is None:
        args.benchmarks = list(TRACE_BENCHMARKS if trace else PAPER_BENCHMARKS)
    if args.seeds is None:
        args.seeds = list(TRACE_SEEDS) if trace else _seeds("0-4")
    if args.variants is None and trace:
        args.variants = list(TRACE_VARIANTS)
    args.log = lambda line: print(line, flush=True)
    if "auto" in (args.jobs, args.cohort):
        requested = f"--jobs {args.jobs} --cohort {args.cohort}"
        args.jobs, args.cohort, why = auto_setting(args.device, args.jobs, args.cohort)
        if not args.dry_run:
            args.log(f"setting: --jobs {args.jobs} --cohort {args.cohort} ({requested} on {why})")
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    # SIGTERM unwinds like Ctrl-C, so a --jobs pool is terminated with its parent.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step == "search":
        return search(args)
    try:
        jobs = grid_jobs(args, role=args.step)
    except ValueError as err:  # e.g. ~dhp-strength before its search
        print(f"error: {err}", file=sys.stderr)
        return 2
    states = [run_state(*job) for job in jobs]
    estimates = job_estimates(jobs, states, *estimate_sources(args))
    print_plan(jobs, states, estimates, args.log, args.jobs)
    if args.dry_run:
        for (config, run_dir, _, _), state in zip(jobs, states):
            print(f"{state:>10}  {run_dir}  ({train_command(asdict(config))})")
        return 0
    stop_at = time.time() + 60 * args.stop_after if args.stop_after is not None else None
    started = time.perf_counter()
    try:
        counts = execute(jobs, data_dir=args.data_dir, device=args.device,
                         summaries=args.summaries, log=args.log, stop_at=stop_at,
                         processes=args.jobs, cohort=args.cohort, estimates=estimates)
    except ConfigMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.step}: {counts['finished']} trained ({counts['resumed']} resumed), "
          f"{counts['skipped']} already finished, {counts['diverged']} diverged, "
          f"{counts['failed']} failed, of {len(jobs)} runs "
          f"in {time.perf_counter() - started:.0f}s", flush=True)
    return 1 if counts["failed"] else 0


def run_state(config, run_dir, role, summary_path) -> str:
    r"""What the grid will do with a run: nothing (finished here, or recorded in a summary),
    resume it from its checkpoint, or train it."""
    if (run_dir / METRICS_NAME).exists():
        return "finished"
    if recorded_result(config, summary_path):
        return "recorded"
    return "to resume" if (run_dir / CHECKPOINT_NAME).exists() else "to run"


def estimate_sources(args) -> tuple:
    r"""What :func:`job_estimates` reads for this grid: the machine its runs train on (with the
    threads each run gets) and their setting, the records folders, the checkout's commit ages."""
    threads = 1 if args.jobs > 1 else torch.get_num_threads()  # main set --threads
    gpu = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    here = {"machine": {**machine(args.device if gpu else "cpu"), "torch_threads": threads},
            "setting": {"jobs": args.jobs, "cohort": args.cohort}}
    return here, record_folders(args.summaries), commit_ages()


def print_plan(jobs, states, estimates, log, processes: int = 1) -> None:
    r"""One line per benchmark, and one for them all when there are several: the runs, how many
    are already done or will be trained, and an estimate of the training time
    (:func:`job_estimates`)."""
    plan = {}  # benchmark → {state: count, "seconds": expected, "unknown": runs without one}
    for (config, _, _, _), state, estimate in zip(jobs, states, estimates):
        counts = plan.setdefault(config.benchmark, {"seconds": 0.0, "unknown": 0})
        counts[state] = counts.get(state, 0) + 1
        if state in ("to run", "to resume"):
            counts["seconds"] += estimate or 0.0
            counts["unknown"] += estimate is None
    if len(plan) > 1:
        plan["all benchmarks"] = {key: sum(counts.get(key, 0) for counts in plan.values())
                                  for key in {key for counts in plan.values() for key in counts}}
    for benchmark, counts in plan.items():
        log(_plan_line(benchmark, counts, processes))


def _plan_line(benchmark: str, counts: dict, processes: int) -> str:
    runs = sum(counts.get(state, 0) for state in ("finished", "recorded", "to resume", "to run"))
    done = counts.get("finished", 0) + counts.get("recorded", 0)
    line = (f"plan: {benchmark}: {runs} runs, {done} already done, "
            f"{counts.get('to resume', 0)} to resume, {counts.get('to run', 0)} to train")
    if counts["seconds"]:
        line += (f"; ≈ {format_duration(counts['seconds'])} of one-process training at the wall "
                 f"times of recorded runs like them (≈ "
                 f"{format_duration(counts['seconds'] / processes)} at --jobs {processes})")
        if counts["unknown"]:
            line += f", {counts['unknown']} run(s) with no recorded peer not counted"
    return line


def search(args) -> int:
    r"""Try each method's values; extend past an edge optimum (≤ MAX_EXTENSIONS); choose.

    With ``--dry-run`` the same rounds are planned from the records alone, up to the first
    round that holds runs still to train (what follows depends on their results).
    """
    values = {method: list(SEARCH_VALUES[method]) for method in args.methods or SEARCH_VALUES}
    started, totals = time.perf_counter(), {status: 0 for status in RUN_STATUS}
    sources = estimate_sources(args)
    settled = set()  # run directories of earlier rounds: each run is counted once
    while True:
        jobs = search_jobs(args, values)
        states = [run_state(*job) for job in jobs]
        estimates = job_estimates(jobs, states, *sources)
        print_plan(jobs, states, estimates, args.log, args.jobs)
        if args.dry_run:
            for (_, run_dir, _, _), state in zip(jobs, states):
                print(f"{state:>10}  {run_dir}")
            if any(state in ("to run", "to resume") for state in states):
                return 0
        else:
            fresh = [index for index, job in enumerate(jobs) if job[1] not in settled]
            settled.update(job[1] for job in jobs)
            try:
                counts = execute([jobs[i] for i in fresh], data_dir=args.data_dir,
                                 device=args.device, summaries=args.summaries, log=args.log,
                                 processes=args.jobs, cohort=args.cohort,
                                 estimates=[estimates[i] for i in fresh])
            except ConfigMismatch as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            totals = {status: totals[status] + counts[status] for status in totals}
        chosen = choose_strengths(jobs, args.benchmark, args.strengths, args.log,
                                  write=not args.dry_run)
        if not extend_values(values, chosen, jobs, args.log):
            break
    if args.dry_run:
        return 0
    print(f"search: {totals['finished']} trained ({totals['resumed']} resumed), "
          f"{totals['skipped']} already finished, {totals['diverged']} diverged, "
          f"{totals['failed']} failed, in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return 1 if totals["failed"] else 0


def extend_values(values: dict, chosen: dict, jobs, log) -> bool:
    r"""Add a decade past each method's edge optimum (or below its weakest value when every
    value diverged) to ``values``; whether any method was extended."""
    extended = False
    for method, method_values in values.items():
        entry = chosen.get(method)
        if len(method_values) - len(SEARCH_VALUES[method]) >= MAX_EXTENSIONS:
            continue
        if entry is None and all_diverged(jobs, method):  # even the weakest is too strong
            best = min(method_values)
        elif entry is None:
            continue
        else:
            best = entry[STRENGTH_OPTION[method]]
        if best == max(method_values) and entry is not None:
            method_values.append(best * 10)
        elif best == min(method_values):
            method_values.append(best / 10)
        else:
            continue
        reason = f"best at the edge ({best:g})" if entry is not None else "every value diverged"
        log(f"{method}: {reason}; extending to {method_values[-1]:g}")
        extended = True
    return extended


if __name__ == "__main__":
    sys.exit(main())
