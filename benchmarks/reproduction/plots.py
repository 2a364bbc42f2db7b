r"""The report's plot: average accuracy after each task, per variant."""

import statistics
from pathlib import Path

from reproduction.naming import BASE_METHODS, VARIANTS, display_name

def plot_curves(variants: dict, title: str, path: Path) -> None:
    r"""Average accuracy after each task, mean ± std over seeds: plain heads solid, DHP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    colors = dict(zip(BASE_METHODS, ("tab:gray", "tab:blue", "tab:green", "tab:orange",
                                     "tab:purple")))
    for variant in VARIANTS:
        runs = variants.get(variant)
        if not runs:
            continue
        base = "finetune" if variant == "dhp" else variant.removeprefix("dhp+")
        curves = [r["metrics"]["avg_acc"] for r in runs]
        length = min(map(len, curves))
        tasks = list(range(1, length + 1))
        means = [100 * statistics.fmean(c[i] for c in curves) for i in range(length)]
        axes.plot(tasks, means, color=colors[base], linestyle="--" if "dhp" in variant else "-",
                  marker="o", markersize=3, label=f"{display_name(variant)} (n={len(runs)})")
        if len(runs) > 1:
            stds = [100 * statistics.stdev(c[i] for c in curves) for i in range(length)]
            axes.fill_between(tasks, [m - s for m, s in zip(means, stds)],
                              [m + s for m, s in zip(means, stds)], color=colors[base], alpha=0.12)
    longest = max((len(r["metrics"]["avg_acc"]) for runs in variants.values() for r in runs),
                  default=1)
    axes.set_xticks(range(1, longest + 1))
    axes.set(xlabel="tasks learned", ylabel="average test accuracy over tasks seen (%)",
             title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: the same records give the same bytes.
    figure.savefig(path, format="png", dpi=90, metadata={"Software": None})
