r"""A grid's time before it runs: each run's expected wall time from recorded runs like it.

A run's best guide is a recorded run of the same benchmark, protocol and variant, trained on this
host (CPU model, cores, device) at the threads and stacking it will have, by the newest code, in
the same number of processes: the code got faster between sittings, and the repository's own
records mix hosts, settings and code versions (estimating from all of them put the Permuted
MNIST grid at 1.6× its measured time).
"""

import subprocess
from dataclasses import asdict
from pathlib import Path

from reproduction.naming import (SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH, SUMMARY_DIR_TRACE,
                                 protocol_tag)
from reproduction.records import REPO, read_summary

SHIPPED_SUMMARIES = REPO / "docs"  # every records folder the repository ships lies under it


def record_folders(summaries: Path) -> list[Path]:
    r"""The grid's own summaries folder, then each records folder the repository ships (a
    folder holding ``runs/``, ``search/`` or ``trace/``)."""
    shipped = sorted({path.parent.resolve()
                      for folder in (SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH, SUMMARY_DIR_TRACE)
                      for path in SHIPPED_SUMMARIES.glob(f"**/{folder}") if path.is_dir()})
    return [summaries] + [folder for folder in shipped if folder != summaries.resolve()]


def commit_ages(root: Path = REPO) -> dict:
    r"""``{commit: age}`` over the checkout's history, 0 for HEAD (newer code, lower age);
    empty off git, where the records' code cannot be ordered."""
    try:
        log = subprocess.run(["git", "log", "--format=%H"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {commit: age for age, commit in enumerate(log.split())}


def job_estimates(jobs, states, here: dict, folders: list[Path], ages: dict) -> list:
    r"""Each job's expected seconds: 0 for a run already done; for one to train, the mean wall
    time of its best-matching records (:func:`best_records`) in ``folders``; None where none.

    ``here``: how the runs will train, as a summary records it: ``machine`` (with
    ``torch_threads`` the threads each run gets) and ``setting`` (``{"jobs": N, "cohort": K}``).
    """
    records = {}  # (benchmark, protocol) → {(method, dhp): [record, ...]}, read once

    def estimate(config, variant: str) -> float | None:
        key = (config.benchmark, protocol_tag(asdict(config)))
        if key not in records:
            records[key] = _finished_records(folders, *key)
        peers = records[key].get((config.method, config.dhp), [])
        chosen = best_records([r for r in peers if r["variant"] == variant] or peers, here, ages)
        return sum(r["wall_s"] for r in chosen) / len(chosen) if chosen else None

    return [estimate(config, summary_path.parent.name) if state in ("to run", "to resume")
            else 0.0 for (config, _, _, summary_path), state in zip(jobs, states)]


def best_records(records: list[dict], here: dict, ages: dict) -> list[dict]:
    r"""Of one kind of run's ``records``, those most like a run trained ``here``: ranked by the
    device kind (CPU or GPU), then the host (CPU model, cores, device; threads per run on a
    CPU), then the runs stacked (``--cohort``: a stacked run records its share, several times
    less), then the newest code (a commit not in ``ages`` counts as oldest), then the processes
    sharing the host (``--jobs``). The code before the processes: between sittings it got up to
    2× faster, while a second process slows a run by ~15% (measured: a grid timed at --jobs 2
    took 3h51m of run walls; the newest code's records at --jobs 1 predicted 3h50m, the older
    code's at --jobs 2 4h44m)."""
    def rank(record) -> tuple:
        machine = {"device": "cpu", **record["machine"]}  # summaries before GPUs lack it
        setting = record.get("setting") or {}
        cpu = here["machine"]["device"] == "cpu"
        fields = ("cpu", "cores", "device") + (("torch_threads",) if cpu else ())
        return ((machine["device"] == "cpu") == cpu,
                all(machine.get(f) == here["machine"].get(f) for f in fields),
                setting.get("cohort", 1) == here["setting"]["cohort"],
                -ages.get(record["commit"], len(ages)),
                setting.get("jobs") == here["setting"]["jobs"])

    ranks = [rank(record) for record in records]
    best = max(ranks, default=None)
    return [record for record, r in zip(records, ranks) if r == best]


def _finished_records(folders: list[Path], benchmark: str, tag: str) -> dict:
    r"""``{(method, dhp): [summary, ...]}``: the finished runs of ``benchmark`` and protocol
    ``tag`` (any seed, any strength, any role) recorded under ``folders``."""
    found = {}
    for root in folders:
        for folder in (SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH, SUMMARY_DIR_TRACE):
            for path in (root / folder / benchmark / tag).glob("*/seed*.json"):
                record = read_summary(path)
                if record and record["metrics"] is not None:
                    found.setdefault((record["method"], record["dhp"]), []).append(record)
    return found
