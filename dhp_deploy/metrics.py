r"""Continual-learning metrics from the accuracy matrix, and the files a run writes about them.

``acc_matrix[i][j]`` is task j's test accuracy (a fraction) after training task i; row i has one
entry per task of the benchmark, including tasks not trained yet. From it:

- ``avg_acc[i]``: mean of ``acc_matrix[i][0..i]``, the average accuracy over the tasks seen so far
  (the DHP paper's metric).
- ``acc``: mean of the last row (Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS 2017).
- ``bwt``: backward transfer, ``mean_{j<T−1} (R[T−1][j] − R[j][j])`` (Lopez-Paz & Ranzato 2017);
  negative means forgetting. ``None`` with a single task.
- ``forgetting``: ``mean_{j<T−1} max_{j≤l<T−1} (R[l][j] − R[T−1][j])`` (Chaudhry et al.,
  "Riemannian Walk for Incremental Learning", ECCV 2018; the max starts once task j was trained),
  with each task's value in ``forgetting_per_task``. ``None`` with a single task.

Here T is the number of rows so far, so the same functions summarise a run in progress.
"""

import csv
import io
from pathlib import Path
from typing import Callable, Optional, Sequence

from dhp_deploy.run_dir import (METRICS_CSV_NAME, METRICS_NAME, PLOT_NAME, atomic_write_bytes,
                                atomic_write_json, atomic_write_text)

__all__ = ["average_accuracies", "final_accuracy", "backward_transfer", "forgetting_per_task",
           "forgetting", "summarize", "run_metrics", "write_run_metrics", "format_duration",
           "METRICS_JSON", "METRICS_CSV", "ACCURACY_PLOT"]

METRICS_JSON, METRICS_CSV, ACCURACY_PLOT = METRICS_NAME, METRICS_CSV_NAME, PLOT_NAME

Matrix = Sequence[Sequence[float]]


def format_duration(seconds: float) -> str:
    r"""``"45s"``, ``"2m05s"``, ``"1h02m"``: durations in progress lines and reports."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def average_accuracies(acc_matrix: Matrix) -> list[float]:
    r"""``avg_acc[i]`` = mean accuracy over tasks 0..i after training task i."""
    return [_mean(row[: i + 1]) for i, row in enumerate(acc_matrix)]


def final_accuracy(acc_matrix: Matrix) -> Optional[float]:
    r"""ACC: mean of the last row (every task's accuracy at the end)."""
    return _mean(acc_matrix[-1]) if acc_matrix else None


def backward_transfer(acc_matrix: Matrix) -> Optional[float]:
    r"""BWT: mean change of each earlier task's accuracy from just after learning it to the end."""
    last = len(acc_matrix) - 1
    if last < 1:
        return None
    return _mean([acc_matrix[last][j] - acc_matrix[j][j] for j in range(last)])


def forgetting_per_task(acc_matrix: Matrix) -> list[float]:
    r"""For each task j before the last trained one: best earlier accuracy minus final accuracy."""
    last = len(acc_matrix) - 1
    return [max(acc_matrix[l][j] for l in range(j, last)) - acc_matrix[last][j]
            for j in range(last)]


def forgetting(acc_matrix: Matrix) -> Optional[float]:
    r"""Average forgetting (Chaudhry et al. 2018) over the tasks before the last trained one."""
    per_task = forgetting_per_task(acc_matrix)
    return _mean(per_task) if per_task else None


def summarize(acc_matrix: Matrix) -> dict:
    r"""Every metric of the module as a JSON-able dict (``acc_matrix`` copied as lists)."""
    return {
        "acc_matrix": [list(row) for row in acc_matrix],
        "avg_acc": average_accuracies(acc_matrix),
        "acc": final_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "forgetting": forgetting(acc_matrix),
        "forgetting_per_task": forgetting_per_task(acc_matrix),
    }


def metrics_csv(acc_matrix: Matrix) -> str:
    r"""One row per trained task: ``after_task, task_0 .. task_{N-1}, avg_acc`` (fractions)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    num_tasks = len(acc_matrix[0]) if acc_matrix else 0
    writer.writerow(["after_task", *[f"task_{j}" for j in range(num_tasks)], "avg_acc"])
    for i, (row, average) in enumerate(zip(acc_matrix, average_accuracies(acc_matrix))):
        writer.writerow([i, *[f"{value:.6f}" for value in row], f"{average:.6f}"])
    return out.getvalue()


PLOT_EXTRA_MISSING = ("accuracy.png skipped: matplotlib is not installed "
                      "(pip install 'dhp-deploy[train]' for the plot)")


def accuracy_plot_png(acc_matrix: Matrix, title: str = "",
                      trace: Optional[dict] = None) -> Optional[bytes]:
    r"""PNG bytes: the accuracy-matrix heatmap beside the average-accuracy curve; None without
    matplotlib (the optional ``train`` extra: a serving host or a grid needs no plots).

    ``trace`` (a DHP run's ``acc_matrix_trace_zeroed``, ``acc_matrix_own_trace`` and
    ``trace_diagnostics``) adds those averages as curves and a third panel: η and
    ‖α⊙Hebb‖/‖θ‖ after each task."""
    try:
        import matplotlib  # lazy: only runs that finish need it
    except ImportError:
        return None

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15 if trace else 10, 4.2))
    heat_axes, curve_axes, *trace_axes = figure.subplots(1, 3 if trace else 2)
    image = heat_axes.imshow(acc_matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, row in enumerate(acc_matrix):
        for j, value in enumerate(row):
            heat_axes.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                           color="white" if value < 0.6 else "black")
    # Tasks are numbered from 1 in the plot, as in the paper and the curve beside it.
    numbers = range(len(acc_matrix))
    heat_axes.set(xlabel="evaluated task j", ylabel="after training task i",
                  title="test accuracy R[i][j]", xticks=list(numbers), yticks=list(numbers),
                  xticklabels=[n + 1 for n in numbers], yticklabels=[n + 1 for n in numbers])
    figure.colorbar(image, ax=heat_axes, fraction=0.046)
    averages = average_accuracies(acc_matrix)
    curve_axes.plot(range(1, len(averages) + 1), [100 * a for a in averages], marker="o",
                    label="with the trace")
    if trace:
        _plot_trace(curve_axes, trace_axes[0], trace)
    curve_axes.set(xlabel="tasks learned", ylabel="average accuracy (%)",
                   title="average accuracy over tasks seen", xticks=range(1, len(averages) + 1))
    curve_axes.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    # Fixed margins: tight_layout measured every label again, 40% of the plot's 0.37 s (a grid
    # draws one per run).
    figure.subplots_adjust(left=0.06 if trace else 0.07, right=0.98, bottom=0.13, top=0.86,
                           wspace=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plot_trace(curve_axes, state_axes, trace: dict) -> None:
    for key, label in (("acc_matrix_trace_zeroed", "trace zeroed (θ alone)"),
                       ("acc_matrix_own_trace", "each task with its own trace")):
        averages = average_accuracies(trace[key])
        curve_axes.plot(range(1, len(averages) + 1), [100 * a for a in averages], marker=".",
                        linestyle="--", label=label)
    curve_axes.legend(fontsize=7)
    tasks = range(1, len(trace["trace_diagnostics"]) + 1)
    state_axes.plot(tasks, [d["eta"] for d in trace["trace_diagnostics"]], marker="o",
                    label="η")
    state_axes.plot(tasks, [d["plastic_to_slow"] for d in trace["trace_diagnostics"]],
                    marker="s", label="‖α⊙Hebb‖ / ‖θ‖")
    state_axes.axhline(0.0, color="gray", linewidth=0.5)
    state_axes.set(xlabel="after task", title="the Hebbian trace", xticks=list(tasks))
    state_axes.set_yscale("symlog", linthresh=0.01)  # η near 0 and a ratio that may explode
    state_axes.legend(fontsize=7)
    state_axes.grid(True, alpha=0.3)


def run_metrics(acc_matrix: Matrix, config: dict, timings: dict,
                extra: Optional[dict] = None) -> dict:
    r"""``metrics.json``'s content: the summary of ``acc_matrix``, ``extra``, config and timings."""
    return {**summarize(acc_matrix), **(extra or {}), "config": config, "timings": timings}


def write_run_metrics(run_dir, acc_matrix: Matrix, config: dict, timings: dict,
                      title: str = "", extra: Optional[dict] = None,
                      log: Callable[[str], None] = lambda line: None) -> dict:
    r"""Write ``metrics.json``, ``metrics.csv`` and ``accuracy.png`` atomically; return the JSON.

    ``extra`` adds keys to ``metrics.json`` (e.g. validation accuracies). Without matplotlib the
    plot is skipped and ``log`` says so in one line.
    """
    run_dir = Path(run_dir)
    metrics = run_metrics(acc_matrix, config, timings, extra)
    atomic_write_json(run_dir / METRICS_JSON, metrics)
    atomic_write_text(run_dir / METRICS_CSV, metrics_csv(acc_matrix))
    trace = extra if extra and extra.get("trace_diagnostics") else None
    png = accuracy_plot_png(acc_matrix, title, trace)
    if png is None:
        log(PLOT_EXTRA_MISSING)
    else:
        atomic_write_bytes(run_dir / ACCURACY_PLOT, png)
    return metrics
