r"""The runs of a strength search and of a grid, and the strengths each grid uses."""

import json
from dataclasses import asdict
from pathlib import Path

from dhp_deploy.regularizers import REGISTRY, STRENGTH_OPTION
from dhp_deploy.run_dir import METRICS_NAME, atomic_write_json
from dhp_deploy.config import TrainConfig
from reproduction.naming import (DIVERGED_NAME, PAPER_PROTOCOL, PAPER_SETTINGS,
                                 SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH, SUMMARY_DIR_TRACE,
                                 DHP_STRENGTH, grid_protocol, grid_variants, protocol_tag,
                                 record_suffix, strengths_key, variant_settings)
from reproduction.records import read_summary, summarize_run
from reproduction.runs import recorded_result

# The values the search tries for each strength option, as each regulariser declares them: around
# the library's defaults, a decade apart. Online EWC's γ is not searched (1.0, the default).
SEARCH_VALUES = {name: cls.search_values for name, cls in REGISTRY.items() if cls.search_values}
SEARCH_SEED = 1000  # disjoint from the grid's seeds 0..4
# A best value at the edge of the values tried is extended by a decade past it, at most this many
# times per method, so the choice is an interior optimum (or says it is not).
MAX_EXTENSIONS = 2


def base_config(args, benchmark: str, **overrides):
    protocol = {name: value for name, value in PAPER_PROTOCOL.items() if name != "val_fraction"}
    for name in ("epochs", "batch_size", "lr", "hidden", "num_tasks", "train_limit", "test_limit",
                 "fisher_samples"):
        if getattr(args, name) is not None:
            protocol[name] = getattr(args, name)
    return TrainConfig(**{"benchmark": benchmark, **PAPER_SETTINGS, **protocol, **overrides})


def search_jobs(args, values: dict) -> list:
    jobs = []
    for method, method_values in values.items():
        for value in sorted(method_values):
            option = STRENGTH_OPTION[method]
            config = base_config(args, args.benchmark, method=method, dhp=args.dhp,
                                 seed=args.seed, val_fraction=args.val_fraction,
                                 **{option: value})
            name = f"{'dhp+' if args.dhp else ''}{method}-{option}={value:g}"
            tag = protocol_tag(asdict(config))
            jobs.append((config, args.runs / "search" / args.benchmark / tag / name /
                         f"seed{args.seed}", "search",
                         args.summaries / SUMMARY_DIR_SEARCH / args.benchmark / tag / name /
                         f"seed{args.seed}.json"))
    return jobs


def choose_strengths(jobs, benchmark: str, path: Path, log, write: bool = True) -> dict:
    r"""Per method, the strength with the best final validation average accuracy → ``path``.

    Stored under ``strengths_key(benchmark, grid protocol, dhp)``, e.g. ``permuted-mnist@e1``:
    the choice serves grids of that protocol (``permuted-mnist+dhp``: searched on the DHP
    network, a study of its own; the grids use the plain network's). Returns what this call chose from ``jobs`` alone (an
    earlier choice stored in ``path`` must not stand in for it: the search extends its values
    from this, and a stale entry would stop the extension short).
    """
    chosen = json.loads(path.read_text()) if path.exists() else {}
    by_method = {}
    for config, run_dir, _, summary_path in jobs:
        option = STRENGTH_OPTION[config.method]
        summary = _search_summary(run_dir, summary_path)
        if summary is None:
            continue
        if summary["diverged"]:  # a result: ranks below every finished value
            by_method.setdefault(config.method, []).append(
                {option: getattr(config, option), "val_acc": None, "diverged": True})
            continue
        if summary["metrics"].get("val_avg_acc") is None:
            continue
        by_method.setdefault(config.method, []).append(
            {option: getattr(config, option), "val_acc": summary["metrics"]["val_avg_acc"][-1]})
    key = strengths_key(benchmark, grid_protocol(asdict(jobs[0][0])), jobs[0][0].dhp)
    entry, fresh = chosen.setdefault(key, {}), {}
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
            log(f"{benchmark} {method}: every strength diverged; nothing chosen yet")
            entry.pop(method, None)  # a choice stored earlier is no longer what the records say
            continue
        best = max(finished, key=lambda trial: trial["val_acc"])  # ties: the first (smallest)
        option = STRENGTH_OPTION[method]
        values = [trial[option] for trial in trials]
        at_edge = best[option] in (min(values), max(values))
        entry[method] = fresh[method] = {
            option: best[option], "val_acc": best["val_acc"], "trials": trials,
            "at_edge": at_edge, "seed": jobs[0][0].seed,
            "val_fraction": jobs[0][0].val_fraction, "protocol": protocol_tag(asdict(jobs[0][0]))}
        log(f"{key} {method}: {option} = {best[option]:g} (val avg acc "
            f"{100 * best['val_acc']:.2f}%)")
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, chosen)
    return fresh
def _search_summary(run_dir: Path, summary_path: Path) -> dict | None:
    r"""A finished or diverged search run's summary: from its run directory, else (a run made on
    another machine) its recorded summary; None while it has neither."""
    if (run_dir / METRICS_NAME).exists() or (run_dir / DIVERGED_NAME).exists():
        return summarize_run(run_dir)
    return read_summary(summary_path)


def all_diverged(jobs, method: str) -> bool:
    r"""Whether every strength tried for ``method`` in ``jobs`` diverged (then the search goes a
    decade below the weakest)."""
    summaries = [_search_summary(run_dir, summary_path)
                 for config, run_dir, _, summary_path in jobs if config.method == method]
    return bool(summaries) and all(s is not None and s["diverged"] for s in summaries)


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


def dhp_network_strengths(path: Path, benchmark: str, protocol: str) -> dict:
    r"""``{method: {option: value}}`` searched on the DHP network for ``benchmark`` under
    ``protocol`` (``reproduce.py search --dhp``), for the ``~dhp-strength`` variants; no fallback
    to another benchmark's: a ValueError names the search to run."""
    chosen = json.loads(path.read_text()) if path.exists() else {}
    key = strengths_key(benchmark, protocol, dhp=True)
    if key not in chosen:
        raise ValueError(f"~{DHP_STRENGTH} needs the strengths searched on the DHP network "
                         f"({key} in {path}): run reproduce.py search --dhp --benchmark "
                         f"{benchmark} first")
    return {method: {STRENGTH_OPTION[method]: entry[STRENGTH_OPTION[method]]}
            for method, entry in chosen[key].items()}


def grid_jobs(args, role: str = "grid") -> list:
    r"""The runs of a grid (``role`` "grid") or of the trace study ("trace"): every benchmark ×
    seed × variant with the chosen strengths, seed-major.

    The trace study's DHP runs are its own (they record the trace diagnostics, which older grid
    runs lack); a plain partner the grid already recorded is that record, not a new run.
    """
    jobs = []
    for benchmark in args.benchmarks:
        plain = base_config(args, benchmark, seed=0, val_fraction=args.val_fraction)
        strengths = chosen_strengths(args.strengths, benchmark, protocol_tag(asdict(plain)),
                                     args.log)
        for seed in args.seeds:  # seed-major: every variant of seed 0 first, then seed 1, ...
            for variant in grid_variants(benchmark, args.variants):
                settings = variant_settings(variant)
                chosen = (dhp_network_strengths(args.strengths, benchmark,
                                                protocol_tag(asdict(plain)))
                          if record_suffix(variant) else strengths)
                config = base_config(args, benchmark, **settings, seed=seed,
                                     val_fraction=args.val_fraction,
                                     **chosen.get(settings["method"], {}))
                place = Path(benchmark) / protocol_tag(asdict(config)) / variant
                grid_job = (config, args.runs / place / f"seed{seed}", "grid",
                            args.summaries / SUMMARY_DIR_RUNS / place / f"seed{seed}.json")
                if role == "grid" or (not config.dhp and recorded_result(config, grid_job[3])):
                    jobs.append(grid_job)
                else:
                    jobs.append((config, args.runs / role / place / f"seed{seed}", role,
                                 args.summaries / SUMMARY_DIR_TRACE / place / f"seed{seed}.json"))
    return jobs
