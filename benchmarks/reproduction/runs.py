r"""Running the reproduction's trainings: one run (skip, resume or start), provenance, and a
list of runs in this process or in ``--jobs`` one-thread worker processes."""

import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

import dhp_deploy
from dhp_deploy.cohort import Cohort, stack_key
from dhp_deploy.regularizers import OPTIONS
from dhp_deploy.tasks import build_benchmark
from dhp_deploy.metrics import format_duration
from dhp_deploy.run_dir import (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, CheckpointError,
                                atomic_write_json, is_finished, read_config)
from dhp_deploy.train import TrainConfig, TrainingDiverged, TrainingError, start_or_resume
from reproduction.naming import DIVERGED_NAME, train_command
from reproduction.records import read_summary, summarize_run, write_summary

PACKAGE_ROOT = Path(dhp_deploy.__file__).resolve().parents[1]

RUN_STATUS = ("finished", "skipped", "resumed", "started", "diverged", "failed", "postponed")


def same_training(config, training: dict) -> list[str]:
    r"""The settings in which a saved ``training`` dict differs from ``config`` (old configs are
    read as :meth:`TrainConfig.from_json` reads them)."""
    wanted = {**asdict(config), "hidden": list(config.hidden)}
    have = asdict(TrainConfig.from_json({"training": training}))
    have["hidden"] = list(have["hidden"])
    return sorted(k for k in set(wanted) | set(have) if wanted.get(k) != have.get(k))


def recorded_result(config, summary_path: Path) -> str | None:
    r"""``"skipped"``/``"diverged"`` when ``summary_path`` already records this exact run (its
    run directory may live on another machine), else None."""
    summary = read_summary(summary_path)
    if summary is None or same_training(config, summary["config"]["training"]):
        return None
    return "diverged" if summary["diverged"] else "skipped"


def git_commit() -> dict:
    r"""HEAD's hash and the package files changed against it (a run's code), or nulls off git:
    of the checkout the imported dhp_deploy lives in, the code that trains."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True,
                              check=True).stdout
    try:
        dirty = git("status", "--porcelain", "--", "dhp_deploy", "benchmarks/reproduce.py")
        return {"commit": git("rev-parse", "HEAD").strip(),
                "dirty": [line[3:] for line in dirty.splitlines() if line.strip()]}
    except (OSError, subprocess.CalledProcessError):
        # A source tree copied without git (to a GPU host, say): the commit it was copied from,
        # as its sender states it; whether it had uncommitted changes is then unknown (None).
        return {"commit": os.environ.get("DHP_SOURCE_COMMIT"), "dirty": None}


def _record_provenance(run_dir: Path, action: str, role: str, argv: list) -> None:
    path = run_dir / "provenance.json"
    record = json.loads(path.read_text()) if path.exists() else {"role": role, "sessions": []}
    record["sessions"].append({"action": action, **git_commit(), "argv": argv,
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    atomic_write_json(path, record)


class ConfigMismatch(Exception):
    r"""A run directory holds a run of another configuration."""


def run_one(config, benchmark_of, run_dir: Path, *, role: str, device: str, log) -> tuple:
    r"""Finish the run of ``config`` in ``run_dir``: skip it if finished, resume it, or start it.

    ``benchmark_of()`` builds (or returns the cached) benchmark; it is only called when training
    is needed. Returns ``(status, metrics or None)``; raises :class:`ConfigMismatch`. A run that
    diverged (non-finite loss or weights) is a result, not an accident: it is recorded in
    ``diverged.json`` and not retried (the same settings diverge the same way).
    """
    status, run = open_run(config, benchmark_of, run_dir, role=role, device=device, log=log)
    if run is None:
        return status, None
    try:
        outcome = run.run()
    except TrainingError as err:
        outcome = err
    return settle(run_dir, status, outcome, log)


def open_run(config, benchmark_of, run_dir: Path, *, role: str, device: str, log) -> tuple:
    r"""``(status, run)``: the run of ``config`` in ``run_dir`` started or resumed, ready to
    train, or ``("skipped" | "diverged" | "failed", None)`` when there is nothing to train."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).exists():
        try:
            differ = same_training(config, read_config(run_dir)["training"])
        except CheckpointError as err:  # e.g. a newer release's run: never trained over
            raise ConfigMismatch(f"{err}; move it away or use another --runs directory") \
                from None
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
    except TrainingError as err:
        return settle(run_dir, "failed", err, log)
    if status == "resumed":
        log(f"  resuming {run_dir} after task {run.position['task'] + 1} "
            f"epoch {run.position['epoch'] + 1}")
    return status, run


def settle(run_dir: Path, status: str, outcome, log) -> tuple:
    r"""``(status, metrics)`` of a run whose training ended with ``outcome``: its metrics, or the
    TrainingError that stopped it (a divergence is recorded in ``diverged.json``)."""
    if isinstance(outcome, TrainingDiverged):
        log(f"  DIVERGED {run_dir}: {outcome}")
        atomic_write_json(Path(run_dir) / DIVERGED_NAME, {
            "error": str(outcome), **git_commit(),
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return "diverged", None
    if isinstance(outcome, TrainingError):
        log(f"  FAILED {run_dir}: {outcome}")
        return "failed", None
    return status, outcome


class BenchmarkCache:
    r"""The last built benchmark (permuted MNIST holds ~2 GB of tensors: keep one at a time)."""

    def __init__(self, data_dir, device):
        self.data_dir, self.device, self.key, self.benchmark = data_dir, device, None, None

    def get(self, config):
        key = config.data_key()
        if key != self.key:
            self.benchmark = None  # free the old tensors before building the new ones
            self.benchmark = self.build(config)
            self.key = key
        return self.benchmark

    def build(self, config):
        r"""A benchmark of its own, not cached."""
        return build_benchmark(**config.data_arguments(), data_dir=self.data_dir,
                               device=self.device)

    def for_cohort(self):
        r"""A getter for one cohort's runs: runs of the same data (one seed's) share one
        benchmark, read-only as in the one-by-one grid; the cohort's K seeds hold K."""
        built = {}

        def get(config):
            key = config.data_key()
            if key not in built:
                built[key] = self.build(config)
            return built[key]
        return get


def _run_job(job, *, cache, device, summaries, log, stop_at,
             setting=None) -> tuple[str, dict | None]:
    r"""One job ``(config, run_dir, role, summary_path)``: run (or skip) it, keep its summary."""
    config, run_dir, role, summary_path = job
    status = _settled_before(job, stop_at)
    if status is not None:
        return status, None
    status, metrics = run_one(config, lambda: cache.get(config), run_dir, role=role,
                              device=device, log=log)
    _keep_summary(job, status, summaries, device, setting)
    return status, metrics


def _settled_before(job, stop_at) -> str | None:
    r"""``"postponed"`` past ``--stop-after``, the recorded result of a run made elsewhere, or
    None: the job is to be opened."""
    config, run_dir, _, summary_path = job
    finished = (run_dir / METRICS_NAME).exists()
    if stop_at is not None and time.time() >= stop_at and not finished:
        return "postponed"
    return None if finished else recorded_result(config, summary_path)


def _keep_summary(job, status: str, summaries, device, setting=None) -> None:
    # A skipped run keeps its summary (written when it finished); rewrite only a missing one.
    config, run_dir, _, summary_path = job
    fresh = status in ("started", "resumed") or not Path(summary_path).exists()
    if status != "failed" and summaries is not None and fresh:
        write_summary(summary_path, summarize_run(run_dir, command=train_command(asdict(config)),
                                                  device=device, setting=setting))


def _run_cohort(jobs, *, cache, device, summaries, log, stop_at,
                setting=None) -> list[tuple]:
    r"""Jobs whose runs can share one stacked model (:func:`cohorts`): those left to train are
    trained together as a :class:`~dhp_deploy.cohort.Cohort`; ``[(status, metrics, seconds)]``,
    seconds being each trained run's share of the cohort's time."""
    results, opened, tried = [None] * len(jobs), [], []
    data = cache.for_cohort()
    for index, job in enumerate(jobs):
        config, run_dir, role, _ = job
        status, run = _settled_before(job, stop_at), None
        if status is None:
            tried.append(index)
            status, run = open_run(config, lambda: data(config), run_dir, role=role,
                                   device=device, log=log)
        if run is None:
            results[index] = (status, None, 0.0)
        else:
            opened.append((index, status, run))
    # Only runs of one stack key train together: a cohort killed between its runs' checkpoints
    # resumes them apart, and seeds of Imbalanced Permuted MNIST differ in their data sizes.
    by_key = {}
    for entry in opened:
        by_key.setdefault(stack_key(entry[2]), []).append(entry)
    for group in by_key.values():
        started = time.perf_counter()
        outcomes = _train_together([run for _, _, run in group], log)
        share = (time.perf_counter() - started) / len(group)
        for index, status, run in group:
            status, metrics = settle(run.run_dir, status, outcomes[run], log)
            results[index] = (status, metrics, share)
    for index in tried:  # as _run_job: not for the postponed or those recorded elsewhere
        _keep_summary(jobs[index], results[index][0], summaries, device, setting)
    return results


def _train_together(runs, log) -> dict:
    r"""``{run: metrics or TrainingError}`` of ``runs`` trained as one cohort, or one at a time
    where they cannot share a stack (the cohort's error says why)."""
    if len(runs) > 1:
        try:
            return Cohort(runs).run()
        except TrainingError as err:
            log(f"  {err}; training them one at a time")
    outcomes = {}
    for run in runs:
        try:
            outcomes[run] = run.run()
        except TrainingError as failure:
            outcomes[run] = failure
    return outcomes


# The settings in which runs of one cohort may differ: each run's regulariser is its own.
COHORT_FREE = ("seed", "method", *OPTIONS, "head_init")


def cohorts(jobs, size: int) -> list[list[int]]:
    r"""The indices of ``jobs`` in groups of at most ``size`` that can train as one stacked model
    (same settings but for COHORT_FREE), each group in the jobs' order; groups ordered by their
    first job. Grid jobs come seed-major, so a stack holds few seeds, and a seed's runs share
    their benchmark (:meth:`BenchmarkCache.for_cohort`)."""
    groups, open_groups = [], {}
    for index, (config, _, role, _) in enumerate(jobs):
        settings = {key: value for key, value in asdict(config).items() if key not in COHORT_FREE}
        key = (role, json.dumps(settings, sort_keys=True, default=str))
        if key not in open_groups or len(open_groups[key]) == size:
            open_groups[key] = []
            groups.append(open_groups[key])
        open_groups[key].append(index)
    return groups


# One process's state in a --jobs pool: its benchmark cache and settings (set by _init_worker).
_WORKER: dict = {}


def _set_worker(data_dir, device, summaries, stop_at, log, setting=None) -> None:
    _WORKER.update(cache=BenchmarkCache(data_dir, device), device=device, summaries=summaries,
                   stop_at=stop_at, log=log, setting=setting)


def _init_worker(data_dir, device, summaries, stop_at, setting) -> None:
    _die_with_parent(signal.SIGTERM)
    torch.set_num_threads(1)  # N one-thread processes: no oversubscription of N cores
    _set_worker(data_dir, device, summaries, stop_at, lambda line: print(line, flush=True),
                setting)


def _die_with_parent(sig) -> None:
    # A killed grid must not leave workers training on (they would race a restarted grid for the
    # same run directories): Linux delivers ``sig`` to this process when its parent dies.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pool_unit(unit):
    r"""One unit of work: ``(numbers, jobs)``, a single job or a cohort's jobs;
    ``[(number, status, metrics, seconds)]``."""
    numbers, jobs = unit
    started = time.perf_counter()
    try:
        if len(jobs) == 1:
            status, metrics = _run_job(jobs[0], **_WORKER)
            return [(numbers[0], status, metrics, time.perf_counter() - started)]
        return [(number, *result)
                for number, result in zip(numbers, _run_cohort(jobs, **_WORKER))]
    except ConfigMismatch as err:
        return [(numbers[0], "mismatch", str(err), 0.0)]


def _outcome(role: str, status: str, metrics, seconds: float) -> str:
    if status not in ("started", "resumed") or metrics is None:
        return status
    # The search shows validation accuracy only: its choices must not see test data.
    split, key = ("val", "val_avg_acc") if role == "search" else ("test", "avg_acc")
    stacked = metrics["timings"].get("cohort_runs", 1)
    share = f" (its share: {stacked} runs trained together)" if stacked > 1 else ""
    return f"final {split} avg acc {100 * metrics[key][-1]:.2f}% in {seconds:.0f}s{share}"


# The CPU cohort measured 0.81-0.92x the one-by-one grid on a 2-core AMD EPYC and 0.95x on a
# 2-core Intel Xeon (AVX-512), where 2 processes stacking 4 runs each made 1.44x against 2
# one-stack processes' 1.75x; on an H200 1.78x (docs/PERFORMANCE.md, docs/PERFORMANCE_GPU.md):
# stacks on a GPU, one-thread processes on a CPU.
GPU_COHORT = 10
RAM_PER_PROCESS = 4 * 2**30  # a worker's benchmark cache holds a Permuted MNIST seed (~1.7 GB)


def auto_setting(device: str, jobs, cohort) -> tuple[int, int, str]:
    r"""``(jobs, cohort, why)`` for ``"auto"`` values: on CUDA one process stacking GPU_COHORT
    runs (processes time-sharing one GPU do not scale); on the CPU one one-thread process per
    core the memory allows, no stacking."""
    if str(device).startswith("cuda"):
        chosen = (1 if jobs == "auto" else jobs, GPU_COHORT if cohort == "auto" else cohort)
        return (*chosen, "a GPU: one process, runs stacked")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = max(1, min(cores or 1, memory // RAM_PER_PROCESS))
    chosen = (fits if jobs == "auto" else jobs, 1 if cohort == "auto" else cohort)
    return (*chosen, f"a CPU: {cores} cores, {memory / 2**30:.0f} GiB: one-thread processes")


def time_left(pending: list, measured: list, processes: int) -> str:
    r"""The time left: each ``pending`` job's expected seconds (None: the mean of the runs
    trained so far) scaled by how the ``measured`` runs (``(seconds, expected)``) compared with
    their expectations (this host's speed, this sitting's load), over ``processes``."""
    if not measured:
        return "n/a"
    mean = sum(seconds for seconds, _ in measured) / len(measured)
    known = [(seconds, estimate) for seconds, estimate in measured if estimate]
    speed = (sum(seconds for seconds, _ in known) / sum(estimate for _, estimate in known)
             if known else 1.0)
    left = sum(mean if estimate is None else estimate * speed for estimate in pending)
    return format_duration(left / processes)


def execute(jobs, *, data_dir, device, summaries, log, stop_at=None, processes=1,
            cohort=1, estimates=None) -> dict:
    r"""Run ``jobs`` (``(config, run_dir, role, summary_path)``), ``processes`` at a time (one
    torch thread each when more than one), up to ``cohort`` compatible runs trained together as
    one stacked model (:func:`cohorts`); return status counts. One progress line per job with
    the grid's state: jobs done / total and the ETA (:func:`time_left`) from ``estimates``,
    each job's expected seconds (0: nothing to train; None: unknown)."""
    counts = {status: 0 for status in RUN_STATUS}
    expected = list(estimates) if estimates is not None else [None] * len(jobs)
    pending, measured, done = set(range(1, len(jobs) + 1)), [], 0
    setting = {"jobs": processes, "cohort": cohort}  # recorded in each summary
    units = [([index + 1 for index in group], [jobs[index] for index in group])
             for group in cohorts(jobs, cohort)]
    if processes > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            processes, _init_worker, (data_dir, device, summaries, stop_at, setting))
        results = pool.imap_unordered(_pool_unit, units)
    else:  # in this process, with its thread setting
        pool = None
        _set_worker(data_dir, device, summaries, stop_at, log, setting)
        results = map(_pool_unit, units)
    try:
        for unit_results in results:  # one run's, or a cohort's runs' (they finish together)
            lines = []
            for number, status, metrics, seconds in unit_results:
                if status == "mismatch":
                    raise ConfigMismatch(metrics)
                _, run_dir, role, _ = jobs[number - 1]
                counts[status] += 1
                done += 1
                pending.discard(number)
                if status in ("started", "resumed") and metrics is not None:
                    counts["finished"] += 1
                    measured.append((seconds, expected[number - 1]))
                lines.append((done, run_dir, _outcome(role, status, metrics, seconds)))
            eta = f"ETA {time_left([expected[n - 1] for n in pending], measured, processes)}"
            for done_then, run_dir, outcome in lines:
                log(f"[{done_then}/{len(jobs)} done, {eta}] {run_dir}: {outcome}")
    finally:
        if pool is not None:
            pool.terminate()
    if counts["postponed"]:
        log(f"time is up (--stop-after): {counts['postponed']} runs left for a later sitting")
    return counts
