r"""The trace study's section of docs/RESULTS.md: why DHP collapses on a shared head, and what
each intervention does (records of ``reproduce.py trace``: role "trace")."""

import statistics
from collections import defaultdict
from pathlib import Path

from reproduction.naming import TRACE_PAIRS, TRACE_TREATMENTS, display_name
from reproduction.stats import collapsed, mean_std, verdict

RECOVERED, NOT_RECOVERED = 0.75, 0.25  # share of the gap to X an evaluation must win back
CONFIRM_SHARE = 0.8  # of the seeds with a gap: 8 of 10, 4 of 5

CRITERIA = f"""\
**Criteria, stated before the runs.** For a pair X / DHP+X and a seed where DHP+X ends below X
(gap g = X − DHP+X in final average accuracy), each DHP+X run's final weights are evaluated
twice more: with the trace set to zero (θ alone: *zeroed*) and with every task k read through
the trace saved at the end of task k (*own trace*: what the trace held for that task before
later tasks rewrote it). The recovered share of the gap is (evaluation − DHP+X) / g. The
hypothesis — on a shared head every later task rewrites every class's trace column and nothing
protects it — is **confirmed** for a pair when the own-trace or the zeroed evaluation recovers
≥ {RECOVERED:.0%} of the gap in at least {CONFIRM_SHARE:.0%} of its seeds with a gap (8 of 10,
4 of 5), **refuted** when both recover < {NOT_RECOVERED:.0%} in that many seeds (the damage is
then in the slow weights, not in what the trace does at test time); otherwise it is partial
and the table says where the damage is. A run that stopped without an accuracy has no final weights
to evaluate: it is left out of the count and listed with the three evaluations at its last good
checkpoint (this treatment of stopped runs was settled after the first run of the study, a stop,
and before any finished run was seen)."""


def _progress(record) -> dict:
    r"""A run's metrics, or for a stopped run what it had at its last good checkpoint."""
    return record["metrics"] or (record["diverged"] or {}).get("last_good") or {}


def _final_average(matrix) -> float:
    return statistics.fmean(matrix[-1]) if matrix else None


def _study_runs(records, benchmark: str, protocol: str) -> dict:
    r"""``{variant: {seed: record}}``: the study's DHP runs (role trace, diagnostics recorded)
    and plain partners from the grid or the study."""
    runs = defaultdict(dict)
    for r in records:
        if (r["benchmark"], r["protocol"]) != (benchmark, protocol):
            continue
        if r["role"] == "trace" or (r["role"] == "grid" and not r["dhp"]):
            runs[r["variant"]].setdefault(r["seed"], r)
    return runs


def _recovery_rows(plain: dict, dhp: dict) -> list[tuple]:
    rows = []
    for seed in sorted(set(plain) & set(dhp)):
        base, run = plain[seed], dhp[seed]
        if base["metrics"] is None:
            continue
        x = base["metrics"]["avg_acc"][-1]
        if run["metrics"] is None:
            rows.append((seed, x, None, None, None, None, None))
            continue
        m = run["metrics"]
        with_trace = m["avg_acc"][-1]
        zeroed = _final_average(m["acc_matrix_trace_zeroed"])
        own = _final_average(m["acc_matrix_own_trace"])
        gap = x - with_trace
        share = (lambda value: (value - with_trace) / gap if gap > 0 and value is not None
                 else None)
        rows.append((seed, x, with_trace, zeroed, own, share(zeroed), share(own)))
    return rows


def _pair_verdict(rows) -> str:
    stopped = sum(1 for row in rows if row[2] is None)
    gapped = [row for row in rows if row[2] is not None and row[1] - row[2] > 0]
    note = f"; {stopped} stopped run(s) listed below" if stopped else ""
    if not gapped:
        return f"no finished seed with a gap: DHP+X did not end below X{note}"
    best = [max(v for v in row[5:] if v is not None) for row in gapped]
    recovered = sum(share >= RECOVERED for share in best)
    lost = sum(share < NOT_RECOVERED for share in best)
    need = CONFIRM_SHARE * len(gapped)
    call = ("**confirmed**" if recovered >= need else
            "**refuted**" if lost >= need else "**partial**")
    return (f"{call}: of {len(gapped)} finished seeds with a gap, {recovered} recover ≥ "
            f"{RECOVERED:.0%} through the trace-zeroed or own-trace evaluation and {lost} "
            f"recover < {NOT_RECOVERED:.0%}{note}")


def _cell(value, digits=2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def _share(value) -> str:
    return "—" if value is None else f"{value:.0%}"


def _pair_table(plain_name, dhp_name, rows, stopped: list) -> list[str]:
    lines = [f"**{display_name(dhp_name)} vs {display_name(plain_name)}** — final average "
             "accuracy (%) per seed:", "",
             "| seed | X | DHP+X | DHP+X, trace zeroed | DHP+X, own trace | recovered by "
             "zeroing | recovered by own trace |", "|---|---|---|---|---|---|---|"]
    for seed, x, with_trace, zeroed, own, share_zeroed, share_own in rows:
        shown = "stopped" if with_trace is None else _cell(with_trace)
        lines.append(f"| {seed} | {_cell(x)} | {shown} | {_cell(zeroed)} | {_cell(own)} "
                     f"| {_share(share_zeroed)} | {_share(share_own)} |")
    lines += ["", f"Verdict: {_pair_verdict(rows)}.", ""]
    return lines + _stopped_lines(stopped)


def _stopped_lines(stopped: list) -> list[str]:
    r"""Each stopped run at its last good checkpoint: the three evaluations and the trace."""
    lines = []
    for record in stopped:
        good = _progress(record)
        if not good.get("acc_matrix_trace_zeroed"):
            continue
        task = len(good["acc_matrix"])
        state = good["trace_diagnostics"][-1]
        lines.append(f"- seed {record['seed']} stopped in task {task + 1}; after task {task} "
                     f"its average accuracy was {_cell(statistics.fmean(good['acc_matrix'][-1][:task]))}% "
                     f"with the trace, {_cell(statistics.fmean(good['acc_matrix_trace_zeroed'][-1][:task]))}% "
                     f"zeroed, {_cell(statistics.fmean(good['acc_matrix_own_trace'][-1][:task]))}% "
                     f"with own traces; η {state['eta']:.3g}, max abs(Hebb) "
                     f"{state['max_abs_hebb']:.3g}, ‖α⊙Hebb‖/‖θ‖ {state['plastic_to_slow']:.3g}.")
    return lines + ([""] if lines else [])


DIAGNOSTIC_KEYS = (("eta", "η"), ("max_abs_hebb", "max abs(Hebb)"),
                   ("plastic_to_slow", "‖α⊙Hebb‖/‖θ‖"), ("mean_abs_alpha", "mean abs(α)"),
                   ("lr_max_curvature", "lr · max curvature"))


def _diagnostics_table(name: str, runs: dict) -> list[str]:
    r"""Per task, the median over seeds of each diagnostic (medians: a few exploding traces
    would swamp a mean), with the seed count; the min of η beside it."""
    per_task = defaultdict(list)
    for record in runs.values():
        source = _progress(record)
        for task, entry in enumerate(source.get("trace_diagnostics") or []):
            per_task[task].append(entry)
    if not per_task:
        return []
    lines = [f"{display_name(name)}: the trace after each task, median over the finished seeds "
             f"(min η beside its median):", "",
             "| after task | seeds | " + " | ".join(label for _, label in DIAGNOSTIC_KEYS)
             + " | min η |", "|---|---|" + "---|" * (len(DIAGNOSTIC_KEYS) + 1)]
    for task in sorted(per_task):
        entries = per_task[task]
        cells = [f"{statistics.median(e[key] for e in entries):.3g}" for key, _ in DIAGNOSTIC_KEYS]
        lines.append(f"| {task + 1} | {len(entries)} | " + " | ".join(cells)
                     + f" | {min(e['eta'] for e in entries):.3g} |")
    return lines + [""]


def _eta_summary(name: str, runs: dict) -> str | None:
    r"""Where η went at the task ends of a variant's runs (stopped runs up to their last good
    checkpoint): below 0, above 1, exactly at the bound 0 (the clamp holding it there)."""
    ends = []
    for record in runs.values():
        source = _progress(record)
        ends += [entry["eta"] for entry in source.get("trace_diagnostics") or []]
    if not ends:
        return None
    below, above = sum(eta < 0 for eta in ends), sum(eta > 1 for eta in ends)
    pinned = sum(eta == 0 for eta in ends)
    return (f"{display_name(name)}: of {len(ends)} task ends ({len(runs)} runs), η < 0 at "
            f"{below}, η > 1 at {above}, η exactly 0 at {pinned}; η ranged "
            f"{min(ends):.3g} … {max(ends):.3g}.")


def _retrained_lines(records, runs: dict, benchmark: str, protocol: str) -> list[str]:
    r"""The study's DHP runs against the grid's runs of the same configuration and seed, made at
    other commits: how far float-level code changes move a free-η DHP run."""
    grid = {(r["variant"], r["seed"]): r for r in records if r["role"] == "grid"
            and (r["benchmark"], r["protocol"]) == (benchmark, protocol)}
    diffs, flipped = [], []
    for _, dhp_name in TRACE_PAIRS:
        for seed, record in runs.get(dhp_name, {}).items():
            other = grid.get((dhp_name, seed))
            if other is None:
                continue
            if (record["metrics"] is None) != (other["metrics"] is None):
                flipped.append(f"{display_name(dhp_name)} seed {seed}")
            elif record["metrics"] is not None:
                diffs.append(abs(record["metrics"]["avg_acc"][-1]
                                 - other["metrics"]["avg_acc"][-1]))
    if not diffs and not flipped:
        return []
    median = 100 * statistics.median(diffs) if diffs else float("nan")
    return [f"The study retrained the grid's DHP runs with the same configurations and seeds at "
            f"one commit. Their final average accuracies differ from the grid's (trained at "
            f"earlier commits, the same maths up to float rounding) by {median:.2f} pp in the "
            f"median and up to {100 * max(diffs, default=0):.2f} pp over {len(diffs)} pairs; "
            + (f"{len(flipped)} run(s) stopped in one and finished in the other "
               f"({', '.join(flipped)})" if flipped else "none stopped in one and not the other")
            + ". With the free η these runs amplify float-level differences; the study's "
            "comparisons are within its own runs.", ""]


def _cost_line(runs: dict) -> list[str]:
    r"""What the two extra evaluations per task cost, from the runs' own timings."""
    timings = [r["timings"] | {"wall": r["wall_s"]} for variant in runs.values()
               for r in variant.values()
               if r["metrics"] is not None and r["timings"].get("trace_diagnostics_s")]
    if not timings:
        return []
    median = statistics.median
    return [f"The diagnostics cost {median(t['trace_diagnostics_s'] for t in timings):.1f} s a "
            f"run here (median of {len(timings)}): "
            f"{median(t['trace_diagnostics_s'] / t['evaluate_s'] for t in timings):.2f}× the "
            f"run's own evaluations, "
            f"{100 * median(t['trace_diagnostics_s'] / t['wall'] for t in timings):.1f}% of its "
            f"wall time.", ""]


def _outcome(runs: dict) -> str:
    finished = [r for r in runs.values() if r["metrics"] is not None]
    stopped = len(runs) - len(finished)
    return (f"{len(runs)} runs: {stopped} stopped without an accuracy, "
            f"{sum(map(collapsed, finished))} of the {len(finished)} finished collapsed")


def _paired_finals(base: dict, other: dict) -> list[float]:
    seeds = sorted(s for s in set(base) & set(other)
                   if base[s]["metrics"] is not None and other[s]["metrics"] is not None)
    return [other[s]["metrics"]["avg_acc"][-1] - base[s]["metrics"]["avg_acc"][-1] for s in seeds]


def _final_mean(runs: dict, variant: str) -> str:
    values = [r["metrics"]["avg_acc"][-1] for r in runs.get(variant, {}).values()
              if r["metrics"] is not None]
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _pairs(runs: dict) -> list[tuple[str, str]]:
    r"""The study's pairs (X, DHP+X), then any other regulariser's whose DHP+X was run with an
    intervention (``dhp+ewc~eta-bound``: whether the default is stable for every method)."""
    pairs = list(TRACE_PAIRS)
    for variant in sorted(runs):
        base, _, treatment = variant.partition("~")
        if treatment in TRACE_TREATMENTS and base.startswith("dhp+") \
                and base not in {dhp for _, dhp in pairs}:
            pairs.append((base[4:], base))
    return pairs


def _intervention_rows(runs: dict) -> list[str]:
    lines = ["| variant | runs | X | DHP+X (paper) | with the intervention | intervention − X "
             "| intervention − DHP+X |", "|---|---|---|---|---|---|---|"]
    for name in TRACE_TREATMENTS:
        for plain_name, dhp_name in _pairs(runs):
            treated = runs.get(f"{dhp_name}~{name}", {})
            if not treated:
                continue
            lines.append(
                f"| {display_name(f'{dhp_name}~{name}')} | {_outcome(treated)} "
                f"| {_final_mean(runs, plain_name)} | {_final_mean(runs, dhp_name)} "
                f"| {_final_mean(runs, f'{dhp_name}~{name}')} "
                f"| {verdict(_paired_finals(runs.get(plain_name, {}), treated))} "
                f"| {verdict(_paired_finals(runs.get(dhp_name, {}), treated))} |")
    return lines + [""]


def trace_section(records) -> list[str]:
    r"""The study per benchmark and protocol it ran on: criteria, recovery per pair, the trace's
    state per task, and each intervention against X and the paper's DHP+X."""
    keys = sorted({(r["benchmark"], r["protocol"]) for r in records if r["role"] == "trace"})
    if not keys:
        return []
    lines = ["## The Hebbian trace on a shared head", "", CRITERIA, ""]
    for benchmark, protocol in keys:
        runs = _study_runs(records, benchmark, protocol)
        lines += [f"### {benchmark} — protocol `{protocol}`", ""]
        lines += _retrained_lines(records, runs, benchmark, protocol) + _cost_line(runs)
        for plain_name, dhp_name in TRACE_PAIRS:
            if runs.get(dhp_name):
                lines += [f"{display_name(dhp_name)}: {_outcome(runs[dhp_name])}.", ""]
                stopped = [r for _, r in sorted(runs[dhp_name].items()) if r["metrics"] is None]
                lines += _pair_table(plain_name, dhp_name,
                                     _recovery_rows(runs.get(plain_name, {}), runs[dhp_name]),
                                     stopped)
        etas = [_eta_summary(variant, runs[variant]) for _, dhp_name in _pairs(runs)
                for variant in (dhp_name, *(f"{dhp_name}~{name}" for name in TRACE_TREATMENTS))
                if runs.get(variant)]
        if any(etas):
            lines += ["Where the learned rate η went (the trace update (1 − η)·Hebb + η·mean "
                      "decays only for η in [0, 1]; below 0 it grows, above 1 it overshoots "
                      "and alternates sign, above 2 it grows):", ""]
            lines += [f"- {text}" for text in etas if text] + [""]
        for _, dhp_name in _pairs(runs):
            for variant in (dhp_name, *(f"{dhp_name}~{name}" for name in TRACE_TREATMENTS)):
                lines += _diagnostics_table(variant, runs.get(variant, {}))
        if any(runs.get(f"{dhp}~{name}")
               for name in TRACE_TREATMENTS for _, dhp in _pairs(runs)):
            lines += ["Interventions (ours, not the paper's), final average accuracy (%), "
                      "mean ± std over finished seeds; paired differences as elsewhere "
                      "(Holm-corrected with the report's other tests). Where the study did not "
                      "retrain DHP+X (Split, Imbalanced Permuted MNIST), DHP+X and X are the "
                      "grid's runs of the same seeds:", ""]
            grid_dhp = defaultdict(dict)
            for r in records:
                if (r["role"] == "grid" and r["dhp"]
                        and (r["benchmark"], r["protocol"]) == (benchmark, protocol)):
                    grid_dhp[r["variant"]].setdefault(r["seed"], r)
            lines += _intervention_rows({**grid_dhp, **runs})
    return lines


ADAPTATION_INTRO = """\
The trace is the part of DHP a deployed model can keep using. Each finished DHP run of the study
was exported with `dhp-export --plastic` and served by `PlasticSession` (TorchScript), which was
fed labelled test rows predict-then-learn, {call} rows a call, {stream} rows a stream; the frozen
reference is the same bundle predicting only. Streams: the task the model learned last, its
first (most forgotten) task, and MNIST under a permutation it never saw. After the unseen
stream, every learned task is scored with the adapted trace and with the exported one (the
cost). `python benchmarks/adaptation.py RUN_DIR ...` makes these records."""


def adaptation_section(adaptations: list, out_dir, plot: bool = True) -> list[str]:
    r"""Per variant, each stream's accuracy frozen vs plastic (paired by seed) and the cost of
    adapting on the other tasks; one plot of the running accuracy."""
    if not adaptations:
        return []
    first = adaptations[0]
    lines = ["## What the trace does in a deployed model", "",
             ADAPTATION_INTRO.format(call=first["call"], stream=first["stream"]), "",
             "| benchmark (protocol) | variant | seeds | stream | frozen (%) | plastic (%) "
             "| plastic − frozen | learned tasks after − before |", "|---|---|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for record in adaptations:
        groups[(record["benchmark"], record["protocol"], record["variant"])].append(record)
    for (benchmark, protocol, variant), records in sorted(groups.items()):
        records.sort(key=lambda r: r["seed"])
        for stream in records[0]["streams"]:
            frozen = [r["streams"][stream]["frozen"] for r in records]
            plastic = [r["streams"][stream]["plastic"] for r in records]
            cost = "—"
            if "learned_tasks_after" in records[0]["streams"][stream]:
                cost = verdict([statistics.fmean(r["streams"][stream]["learned_tasks_after"])
                                - statistics.fmean(r["streams"][stream]["learned_tasks_before"])
                                for r in records])
            lines.append(f"| {benchmark} (`{protocol}`) | {display_name(variant)} "
                         f"| {len(records)} | {stream} | {100 * statistics.fmean(frozen):.2f} "
                         f"| {100 * statistics.fmean(plastic):.2f} "
                         f"| {verdict([b - a for a, b in zip(frozen, plastic)])} | {cost} |")
    name = "results-adaptation.png"
    if plot:
        _plot_adaptation(groups, Path(out_dir) / name)
    return lines + ["", f"![running accuracy over the streams, frozen vs plastic]({name})", ""]


def _plot_adaptation(groups: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    streams = list(next(iter(groups.values()))[0]["streams"])
    figure = Figure(figsize=(5 * len(streams), 4))
    for axes, stream in zip(figure.subplots(1, len(streams)), streams):
        for (benchmark, protocol, variant), records in sorted(groups.items()):
            for mode, style in (("frozen", ":"), ("plastic", "-")):
                curves = [r["streams"][stream][f"{mode}_curve"] for r in records]
                mean = [100 * statistics.fmean(values) for values in zip(*curves)]
                window = records[0]["stream"] / len(mean)
                axes.plot([window * (i + 1) for i in range(len(mean))], mean, linestyle=style,
                          label=f"{display_name(variant)}, {mode}")
        axes.set(title=stream, xlabel="rows of the stream seen",
                 ylabel="accuracy over the last window (%)")
        axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=90, metadata={"Software": None})
