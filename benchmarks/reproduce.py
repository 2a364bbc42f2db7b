r"""Reproduce the DHP paper's table: 5 methods × {plain head, DHP head} × benchmarks × seeds.

Two steps, both resumable (run them again after an interruption; nothing finished is redone):

    python benchmarks/reproduce.py search   # regularisation strengths on a validation split
    python benchmarks/reproduce.py grid     # the table's runs with the chosen strengths
    python benchmarks/results.py --from docs/results --out docs/RESULTS.md

``search`` trains each regulariser (plain head) with a few strengths on one benchmark
(``--benchmark``, default split-mnist) with ``val_fraction`` of every task's training set held
out, ranks them by the final average accuracy on those *validation* sets (test data is never
looked at; a best value at the edge is extended a decade past it), and writes the winners to
``docs/results/strengths.json``. ``grid`` trains every (benchmark, variant, seed) on the full
training sets with those strengths, the same strength for X and DHP+X, so DHP's gain is the
head's; a benchmark without a search of its own borrows the closest searched one's strengths.
A run whose loss or weights stop being finite is a result too: ``diverged.json`` records it, the
search ranks that strength last, and it is not retried.

The grid's rows (``--variants``): ``paper``, the ten variants of the paper's table, and
``ablation``, each of them with the other head's θ initialisation (``dhp@linear``: a DHP head with
``nn.Linear``'s init; ``finetune@authors``: a plain head with the authors' init), which separates
what the initialisation and what plasticity contribute to DHP's gain; ``all`` (default) both.

Trainings run through the training API (``dhp_deploy.train.TrainingRun``, the code behind
``dhp-train``), in this process or, with ``--jobs N``, in N one-thread worker processes that
take the next run as they finish (a progress line per run: runs done / total, ETA); the
benchmark's data is built once per (benchmark, seed) per process. A run whose summary is already
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
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import (ABLATION_VARIANTS, DIVERGED_NAME, PAPER_PROTOCOL,  # noqa: E402
                     STRENGTH_OPTION, SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH, SUMMARY_KIND,
                     VARIANTS, grid_protocol, protocol_tag, strengths_key, summarize_run,
                     train_command, write_summary)
from dhp_deploy.metrics import format_duration  # noqa: E402
from dhp_deploy.run_dir import CHECKPOINT_NAME, METRICS_NAME  # noqa: E402

PAPER_BENCHMARKS = ("permuted-mnist", "imbalanced-permuted-mnist", "split-mnist")
# The values the search tries for each regulariser's strength option (STRENGTH_OPTION): around
# the library's defaults, a decade apart. Online EWC's γ is not searched (1.0, the default).
SEARCH_VALUES = {"ewc": (100.0, 1000.0, 10000.0), "online-ewc": (100.0, 1000.0, 10000.0),
                 "si": (0.1, 1.0, 10.0), "mas": (0.1, 1.0, 10.0)}
SEARCH_SEED = 1000  # disjoint from the grid's seeds 0..4
# A best value at the edge of the values tried is extended by a decade past it, at most this many
# times per method, so the choice is an interior optimum (or says it is not).
MAX_EXTENSIONS = 2
RUN_STATUS = ("finished", "skipped", "resumed", "started", "diverged", "failed", "postponed")
# Named groups of variants for --variants: the paper's table, the init ablation, both.
VARIANT_GROUPS = {"paper": VARIANTS, "ablation": ABLATION_VARIANTS,
                  "all": VARIANTS + ABLATION_VARIANTS}


def variant_settings(variant: str) -> dict:
    r"""The TrainConfig settings of a variant: ``"dhp+ewc"`` → method ewc, DHP head;
    ``"dhp"`` → finetune, DHP head; ``"si@authors"`` → si, plain head, the authors' θ init."""
    name, _, head_init = variant.partition("@")
    if name == "dhp":
        settings = {"method": "finetune", "dhp": True}
    elif name.startswith("dhp+"):
        settings = {"method": name[4:], "dhp": True}
    else:
        settings = {"method": name, "dhp": False}
    return {**settings, "head_init": head_init or None}


def same_training(config, training: dict) -> list[str]:
    r"""The settings in which a saved ``training`` dict differs from ``config`` (old configs are
    read as :meth:`TrainConfig.from_json` reads them)."""
    from dhp_deploy.train import TrainConfig

    wanted = {**asdict(config), "hidden": list(config.hidden)}
    have = asdict(TrainConfig.from_json({"training": training}))
    have["hidden"] = list(have["hidden"])
    return sorted(k for k in set(wanted) | set(have) if wanted.get(k) != have.get(k))


def recorded_result(config, summary_path: Path) -> str | None:
    r"""``"skipped"``/``"diverged"`` when ``summary_path`` already records this exact run (its
    run directory may live on another machine), else None."""
    try:
        summary = json.loads(Path(summary_path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("kind") != SUMMARY_KIND or same_training(config, summary["config"]["training"]):
        return None
    return "diverged" if summary.get("diverged") else "skipped"


# --------------------------------------------------------------------------- provenance


def git_commit() -> dict:
    r"""HEAD's hash and the package files changed against it (a run's code), or nulls off git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    try:
        dirty = git("status", "--porcelain", "--", "dhp_deploy", "benchmarks/reproduce.py")
        return {"commit": git("rev-parse", "HEAD").strip(),
                "dirty": [line[3:] for line in dirty.splitlines() if line.strip()]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": []}


def _record_provenance(run_dir: Path, action: str, role: str, argv: list) -> None:
    from dhp_deploy.run_dir import atomic_write_json

    path = run_dir / "provenance.json"
    record = json.loads(path.read_text()) if path.exists() else {"role": role, "sessions": []}
    record["sessions"].append({"action": action, **git_commit(), "argv": argv,
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    atomic_write_json(path, record)


# --------------------------------------------------------------------------- one run


class ConfigMismatch(Exception):
    r"""A run directory holds a run of another configuration."""


def run_one(config, benchmark_of, run_dir: Path, *, role: str, device: str, log) -> tuple:
    r"""Finish the run of ``config`` in ``run_dir``: skip it if finished, resume it, or start it.

    ``benchmark_of()`` builds (or returns the cached) benchmark; it is only called when training
    is needed. Returns ``(status, metrics or None)``; raises :class:`ConfigMismatch`. A run that
    diverged (non-finite loss or weights) is a result, not an accident: it is recorded in
    ``diverged.json`` and not retried (the same settings diverge the same way).
    """
    from dhp_deploy.run_dir import CONFIG_NAME, atomic_write_json, is_finished, read_config
    from dhp_deploy.train import TrainingDiverged, TrainingError, start_or_resume

    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).exists():
        differ = same_training(config, read_config(run_dir)["training"])
        if differ:
            raise ConfigMismatch(f"{run_dir} holds a run with other settings "
                                 f"({', '.join(differ)}); move it away or use another --runs "
                                 f"directory")
    if is_finished(run_dir):
        return "skipped", None
    if (run_dir / DIVERGED_NAME).exists():
        return "diverged", None
    argv = [sys.argv[0], *sys.argv[1:]]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _record_provenance(run_dir, "resume" if (run_dir / CHECKPOINT_NAME).exists() else "start",
                           role, argv)
        run, status = start_or_resume(run_dir, lambda _: benchmark_of(), config, device)
        if status == "resumed":
            log(f"  resuming {run_dir} after task {run.position['task'] + 1} "
                f"epoch {run.position['epoch'] + 1}")
        return status, run.run()
    except TrainingDiverged as err:
        log(f"  DIVERGED {run_dir}: {err}")
        atomic_write_json(run_dir / DIVERGED_NAME, {
            "error": str(err), **git_commit(),
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return "diverged", None
    except TrainingError as err:
        log(f"  FAILED {run_dir}: {err}")
        return "failed", None


class BenchmarkCache:
    r"""The last built benchmark (permuted MNIST holds ~2 GB of tensors: keep one at a time)."""

    def __init__(self, data_dir, device):
        self.data_dir, self.device, self.key, self.benchmark = data_dir, device, None, None

    def get(self, config):
        from dhp_deploy.benchmarks import build_benchmark

        key = json.dumps(config.data_arguments(), sort_keys=True)
        if key != self.key:
            self.benchmark = None  # free the old tensors before building the new ones
            self.benchmark = build_benchmark(**config.data_arguments(), data_dir=self.data_dir,
                                             device=self.device)
            self.key = key
        return self.benchmark


def _run_job(job, *, cache, device, summaries, log, stop_at) -> tuple[str, dict | None]:
    r"""One job ``(config, run_dir, role, summary_path)``: run (or skip) it, keep its summary."""
    config, run_dir, role, summary_path = job
    finished = (run_dir / METRICS_NAME).exists()
    if stop_at is not None and time.time() >= stop_at and not finished:
        return "postponed", None
    recorded = None if finished else recorded_result(config, summary_path)
    if recorded is not None:
        return recorded, None
    status, metrics = run_one(config, lambda: cache.get(config), run_dir, role=role,
                              device=device, log=log)
    # A skipped run keeps its summary (written when it finished); rewrite only a missing one.
    fresh = status in ("started", "resumed") or not Path(summary_path).exists()
    if status != "failed" and summaries is not None and fresh:
        write_summary(summary_path, summarize_run(run_dir, command=train_command(asdict(config))))
    return status, metrics


# One process's state in a --jobs pool: its benchmark cache and settings (set by _init_worker).
_WORKER: dict = {}


def _set_worker(data_dir, device, summaries, stop_at, log) -> None:
    _WORKER.update(cache=BenchmarkCache(data_dir, device), device=device, summaries=summaries,
                   stop_at=stop_at, log=log)


def _init_worker(data_dir, device, summaries, stop_at) -> None:
    import signal

    import torch

    _die_with_parent(signal.SIGTERM)
    torch.set_num_threads(1)  # N one-thread processes: no oversubscription of N cores
    _set_worker(data_dir, device, summaries, stop_at, lambda line: print(line, flush=True))


def _die_with_parent(sig) -> None:
    # A killed grid must not leave workers training on (they would race a restarted grid for the
    # same run directories): Linux delivers ``sig`` to this process when its parent dies.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pool_job(numbered):
    number, job = numbered
    started = time.perf_counter()
    try:
        status, metrics = _run_job(job, **_WORKER)
    except ConfigMismatch as err:
        return number, "mismatch", str(err), 0.0
    return number, status, metrics, time.perf_counter() - started


def execute(jobs, *, data_dir, device, summaries, log, stop_at=None, processes=1) -> dict:
    r"""Run ``jobs`` (``(config, run_dir, role, summary_path)``), ``processes`` at a time (one
    torch thread each when more than one); return status counts. One progress line per job with
    the grid's state: jobs done / total and the ETA at the rate of the runs trained so far."""
    counts = {status: 0 for status in RUN_STATUS}
    trained_seconds, trained, done = 0.0, 0, 0
    if processes > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(
            processes, _init_worker, (data_dir, device, summaries, stop_at))
        results = pool.imap_unordered(_pool_job, enumerate(jobs, 1))
    else:  # in this process, with its thread setting
        pool = None
        _set_worker(data_dir, device, summaries, stop_at, log)
        results = map(_pool_job, enumerate(jobs, 1))
    try:
        for number, status, metrics, seconds in results:
            if status == "mismatch":
                raise ConfigMismatch(metrics)
            config, run_dir, role, _ = jobs[number - 1]
            counts[status] += 1
            done += 1
            if status in ("started", "resumed") and metrics is not None:
                counts["finished"] += 1
                trained, trained_seconds = trained + 1, trained_seconds + seconds
                # The search shows validation accuracy only: its choices must not see test data.
                split, key = ("val", "val_avg_acc") if role == "search" else ("test", "avg_acc")
                what = f"final {split} avg acc {100 * metrics[key][-1]:.2f}% in {seconds:.0f}s"
            else:
                what = status
            left = len(jobs) - done
            eta = (f"ETA {format_duration(trained_seconds / trained * left / processes)}"
                   if trained else "ETA n/a")
            log(f"[{done}/{len(jobs)} done, {eta}] {run_dir}: {what}")
    finally:
        if pool is not None:
            pool.terminate()
    if counts["postponed"]:
        log(f"time is up (--stop-after): {counts['postponed']} runs left for a later sitting")
    return counts


# --------------------------------------------------------------------------- the two steps


def base_config(args, benchmark: str, **overrides):
    from dhp_deploy.train import TrainConfig

    protocol = {name: value for name, value in PAPER_PROTOCOL.items() if name != "val_fraction"}
    for name in ("epochs", "batch_size", "lr", "hidden", "num_tasks", "train_limit", "test_limit",
                 "fisher_samples"):
        if getattr(args, name) is not None:
            protocol[name] = getattr(args, name)
    return TrainConfig(benchmark=benchmark, **protocol, **overrides)


def search_jobs(args, values: dict) -> list:
    jobs = []
    for method, method_values in values.items():
        for value in sorted(method_values):
            option = STRENGTH_OPTION[method]
            config = base_config(args, args.benchmark, method=method, dhp=False, seed=args.seed,
                                 val_fraction=args.val_fraction, **{option: value})
            name = f"{method}-{option}={value:g}"
            tag = protocol_tag(asdict(config))
            jobs.append((config, args.runs / "search" / args.benchmark / tag / name /
                         f"seed{args.seed}", "search",
                         args.summaries / SUMMARY_DIR_SEARCH / args.benchmark / tag / name /
                         f"seed{args.seed}.json"))
    return jobs


def choose_strengths(jobs, benchmark: str, path: Path, log) -> dict:
    r"""Per method, the strength with the best final validation average accuracy → ``path``.

    Stored under ``strengths_key(benchmark, grid protocol)``, e.g. ``permuted-mnist@e1``: the
    choice serves grids of that protocol. Returns that entry.
    """
    from dhp_deploy.run_dir import atomic_write_json

    chosen = json.loads(path.read_text()) if path.exists() else {}
    by_method = {}
    for config, run_dir, _, _ in jobs:
        option = STRENGTH_OPTION[config.method]
        if (run_dir / DIVERGED_NAME).exists():  # a result: ranks below every finished value
            by_method.setdefault(config.method, []).append(
                {option: getattr(config, option), "val_acc": None, "diverged": True})
            continue
        summary = summarize_run(run_dir) if (run_dir / METRICS_NAME).exists() else None
        if summary is None or summary["metrics"].get("val_avg_acc") is None:
            continue
        by_method.setdefault(config.method, []).append(
            {option: getattr(config, option), "val_acc": summary["metrics"]["val_avg_acc"][-1]})
    key = strengths_key(benchmark, grid_protocol(asdict(jobs[0][0])))
    entry = chosen.setdefault(key, {})
    planned = {}
    for config, _, _, _ in jobs:
        planned[config.method] = planned.get(config.method, 0) + 1
    for method, trials in by_method.items():
        if len(trials) < planned[method]:
            log(f"{method}: only {len(trials)} of {planned[method]} strengths finished; "
                f"not choosing yet")
            continue
        finished = [trial for trial in trials if trial["val_acc"] is not None]
        if not finished:
            log(f"{method}: every strength diverged; nothing to choose")
            continue
        best = max(finished, key=lambda trial: trial["val_acc"])  # ties: the first (smallest)
        option = STRENGTH_OPTION[method]
        values = [trial[option] for trial in trials]
        at_edge = best[option] in (min(values), max(values))
        entry[method] = {option: best[option], "val_acc": best["val_acc"], "trials": trials,
                         "at_edge": at_edge,
                         "seed": jobs[0][0].seed, "val_fraction": jobs[0][0].val_fraction,
                         "protocol": protocol_tag(asdict(jobs[0][0]))}
        log(f"{benchmark} {method}: {option} = {best[option]:g} (val avg acc "
            f"{100 * best['val_acc']:.2f}%)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, chosen)
    return entry


# Where a benchmark without a search of its own borrows strengths: the closest searched one.
# (Split MNIST's do not transfer to the permuted ones: its EWC λ diverges on Permuted MNIST.)
STRENGTH_FALLBACK = {"imbalanced-permuted-mnist": ("permuted-mnist", "split-mnist"),
                     "permuted-mnist": ("imbalanced-permuted-mnist", "split-mnist"),
                     "split-fashion-mnist": ("split-mnist",)}


def chosen_strengths(path: Path, benchmark: str, protocol: str, log) -> dict:
    r"""``{method: {option: value}}`` for grids of ``benchmark`` under ``protocol``.

    Its own search under that protocol, else under another protocol, else the closest
    benchmark's (said in the log).
    """
    chosen = json.loads(path.read_text()) if path.exists() else {}
    candidates = []
    for name in (benchmark, *STRENGTH_FALLBACK.get(benchmark, ("split-mnist",))):
        candidates.append(strengths_key(name, protocol))
        candidates += [key for key in sorted(chosen) if key.partition("@")[0] == name]
    own = strengths_key(benchmark, protocol)
    source = next((key for key in candidates if key in chosen), None)
    if source is None:
        log(f"no strengths chosen in {path}: {own} uses the library defaults")
        return {}
    if source != own:
        log(f"{own}: no search of its own in {path}; using {source}'s strengths")
    return {method: {STRENGTH_OPTION[method]: entry[STRENGTH_OPTION[method]]}
            for method, entry in chosen[source].items()}


def grid_jobs(args) -> list:
    jobs = []
    for benchmark in args.benchmarks:
        plain = base_config(args, benchmark, seed=0, val_fraction=args.val_fraction)
        strengths = chosen_strengths(args.strengths, benchmark, protocol_tag(asdict(plain)),
                                     args.log)
        for seed in args.seeds:  # seed-major: every variant of seed 0 first, then seed 1, ...
            for variant in args.variants:
                settings = variant_settings(variant)
                config = base_config(args, benchmark, **settings, seed=seed,
                                     val_fraction=args.val_fraction,
                                     **strengths.get(settings["method"], {}))
                tag = protocol_tag(asdict(config))
                jobs.append((config, args.runs / benchmark / tag / variant / f"seed{seed}", "grid",
                             args.summaries / SUMMARY_DIR_RUNS / benchmark / tag / variant /
                             f"seed{seed}.json"))
    return jobs


# --------------------------------------------------------------------------- command line


def _seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def _names(choices):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; expected some of "
                                             f"{', '.join(choices)}")
        return names
    return parse


def _variants(text: str) -> list[str]:
    names = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name in VARIANT_GROUPS:
            names += VARIANT_GROUPS[name]
        elif name in VARIANT_GROUPS["all"]:
            names.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown variant {name}; expected a group ({', '.join(VARIANT_GROUPS)}) or "
                f"some of {', '.join(VARIANT_GROUPS['all'])}")
    return list(dict.fromkeys(names))


def parse_arguments(argv=None):
    from dhp_deploy.benchmarks import BENCHMARKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("search", "grid"),
                        help="search strengths, or run the grid")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "reproduce",
                        help="root of the run directories (default runs/reproduce)")
    parser.add_argument("--summaries", type=Path, default=REPO / "docs" / "results",
                        help="where run summaries and strengths.json go (default docs/results)")
    parser.add_argument("--strengths", type=Path, help="chosen strengths JSON "
                        "(default SUMMARIES/strengths.json)")
    parser.add_argument("--benchmarks", type=_names(BENCHMARKS), default=list(PAPER_BENCHMARKS),
                        help="grid: comma-separated benchmarks (default the paper's three)")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="split-mnist",
                        help="search: the benchmark to tune on (default split-mnist)")
    parser.add_argument("--variants", type=_variants, default=list(VARIANT_GROUPS["all"]),
                        help="grid: comma-separated variants or groups: paper (the ten of the "
                             "paper's table), ablation (each with the other head's θ init, e.g. "
                             "dhp@linear, finetune@authors), all (default)")
    parser.add_argument("--methods", type=_names(tuple(SEARCH_VALUES)),
                        help="search: regularisers to tune (default all four)")
    parser.add_argument("--seeds", type=_seeds, default=_seeds("0-4"),
                        help="grid: seeds, e.g. 0-4 or 0,2 (default 0-4)")
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
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each a one-thread process (default 1)")
    parser.add_argument("--stop-after", type=float, metavar="MINUTES",
                        help="start no new run after this many minutes (resume later)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    args = parser.parse_args(argv)
    if args.val_fraction is None:
        args.val_fraction = 0.1 if args.step == "search" else 0.0
    if args.strengths is None:
        args.strengths = args.summaries / "strengths.json"
    args.log = lambda line: print(line, flush=True)
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    # SIGTERM unwinds like Ctrl-C, so a --jobs pool is terminated with its parent.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.step == "search":
        return search(args)
    jobs = grid_jobs(args)
    if args.dry_run:
        for config, run_dir, _, summary_path in jobs:
            state = ("finished" if (run_dir / METRICS_NAME).exists() else
                     "recorded" if recorded_result(config, summary_path) else
                     "to resume" if (run_dir / CHECKPOINT_NAME).exists() else "to run")
            print(f"{state:>10}  {run_dir}  ({train_command(asdict(config))})")
        return 0
    stop_at = time.time() + 60 * args.stop_after if args.stop_after is not None else None
    started = time.perf_counter()
    try:
        counts = execute(jobs, data_dir=args.data_dir, device=args.device,
                         summaries=args.summaries, log=args.log, stop_at=stop_at,
                         processes=args.jobs)
    except ConfigMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.step}: {counts['finished']} trained ({counts['resumed']} resumed), "
          f"{counts['skipped']} already finished, {counts['diverged']} diverged, "
          f"{counts['failed']} failed, of {len(jobs)} runs "
          f"in {time.perf_counter() - started:.0f}s", flush=True)
    return 1 if counts["failed"] else 0


def search(args) -> int:
    r"""Try each method's values; extend past an edge optimum (≤ MAX_EXTENSIONS); choose."""
    values = {method: list(SEARCH_VALUES[method]) for method in args.methods or SEARCH_VALUES}
    started, totals = time.perf_counter(), {status: 0 for status in RUN_STATUS}
    while True:
        jobs = search_jobs(args, values)
        if args.dry_run:
            for config, run_dir, _, _ in jobs:
                done = (run_dir / METRICS_NAME).exists()
                print(f"{'finished' if done else 'to run':>10}  {run_dir}")
            return 0
        try:
            counts = execute(jobs, data_dir=args.data_dir, device=args.device,
                             summaries=args.summaries, log=args.log, processes=args.jobs)
        except ConfigMismatch as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        totals = {status: totals[status] + counts[status] for status in totals}
        chosen = choose_strengths(jobs, args.benchmark, args.strengths, args.log)
        extended = False
        for method, method_values in values.items():
            entry = chosen.get(method)
            if entry is None or len(method_values) - len(SEARCH_VALUES[method]) >= MAX_EXTENSIONS:
                continue
            best = entry[STRENGTH_OPTION[method]]
            if best == max(method_values):
                method_values.append(best * 10)
            elif best == min(method_values):
                method_values.append(best / 10)
            else:
                continue
            args.log(f"{method}: best at the edge ({best:g}); extending to {method_values[-1]:g}")
            extended = True
        if not extended:
            break
    print(f"search: {totals['finished']} trained ({totals['resumed']} resumed), "
          f"{totals['skipped']} already finished, {totals['diverged']} diverged, "
          f"{totals['failed']} failed, in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
