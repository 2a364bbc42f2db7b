r"""Accuracy of a model on every task of a benchmark, and what the DHP trace does to it."""

import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.layer import DHPSoftmax
from dhp_deploy.network import DHPNet, predicted_classes
from dhp_deploy.tasks import Benchmark

__all__ = ["EVAL_BATCH", "task_heads", "dhp_heads", "evaluate", "evaluate_with_traces",
           "trace_diagnostic_sets", "trace_state"]

EVAL_BATCH = 1000  # test examples per forward pass during evaluation


def task_heads(benchmark: Benchmark, device) -> list[Optional[Tensor]]:
    # Per task, the global class ids of its head in the multi-head scenario, else None (all).
    if benchmark.scenario != "task":
        return [None] * len(benchmark.tasks)
    return [torch.tensor(task.classes, device=device) for task in benchmark.tasks]


def dhp_heads(model: nn.Module) -> list[DHPSoftmax]:
    return [module for module in model.modules() if isinstance(module, DHPSoftmax)]


@torch.no_grad()
def evaluate(model: nn.Module, benchmark: Benchmark, split: str = "test",
             replicas: Replicas = SINGLE,
             traces: Optional[Callable[[int], list[Tensor]]] = None) -> list[float]:
    r"""Accuracy (a fraction) on every task's ``split`` ("test" or "val"), in eval mode.

    Multi-head (scenario "task"): argmax within the task's classes. Otherwise over all classes.
    The model's mode is restored; the DHP trace is read, never updated. ``traces(k)``, if given,
    is the trace of each DHP head to evaluate task k with (the model's own is put back after).
    Data-parallel, each rank counts on its shard and one all-reduce sums the counts: every rank
    returns the same figures.
    """
    return evaluate_with_traces(model, benchmark, [traces], split, replicas)[0][0]


@torch.no_grad()
def evaluate_with_traces(model: nn.Module, benchmark: Benchmark, trace_sets: list,
                         split: str = "test", replicas: Replicas = SINGLE
                         ) -> tuple[list[list[float]], list[float]]:
    r""":func:`evaluate` once for each entry of ``trace_sets`` (its ``traces``; None: the model's
    own). Returns the rows, and the seconds each entry took, the trunk's pass counted with the
    first.

    A trace changes the head's output alone, so for a trunk + head network (:class:`DHPNet`)
    each batch's trunk pass, nearly all of the arithmetic, serves every entry: three rows (a DHP
    run's accuracies and its two trace diagnostics) cost about one. Other models run whole per
    entry. The rows equal separate :func:`evaluate` calls: the same ops on the same batches.
    """
    was_training = model.training
    model.eval()
    tasks, times = benchmark.tasks, [0.0] * len(trace_sets)
    heads = dhp_heads(model) if any(t is not None for t in trace_sets) else []
    kept = [head.hebb.clone() for head in heads]  # copied back in place: a cohort's are views
    correct = torch.zeros(len(trace_sets), len(tasks), dtype=torch.int64,
                          device=tasks[0].y_train.device)
    shared = isinstance(model, DHPNet)
    try:
        for index, (task, head) in enumerate(zip(tasks, task_heads(benchmark, None))):
            started = time.perf_counter()
            x = replicas.shard(getattr(task, f"x_{split}"))
            y = replicas.shard(getattr(task, f"y_{split}"))
            batches = list(zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)))
            if shared:
                batches = [(model.trunk(xb), yb) for xb, yb in batches]
            for entry, traces in enumerate(trace_sets):
                traces = traces(index) if traces is not None else kept
                for layer, trace in zip(heads, traces):
                    layer.hebb.copy_(trace)
                for inputs, yb in batches:
                    logits = model.head(inputs) if shared else model(inputs)
                    correct[entry, index] += (predicted_classes(logits, head) == yb).sum()
                times[entry] += time.perf_counter() - started
                started = time.perf_counter()
    finally:
        for layer, trace in zip(heads, kept):
            layer.hebb.copy_(trace)
        model.train(was_training)
    counts = replicas.all_reduce(correct).tolist()
    sizes = [max(len(getattr(task, f"y_{split}")), 1) for task in tasks]
    return [[count / size for count, size in zip(row, sizes)] for row in counts], times


def trace_diagnostic_sets(model: nn.Module, saved_traces: list, task_id: int) -> list:
    r"""The traces of the two diagnostics after task ``task_id``, as
    :func:`evaluate_with_traces` entries: every task with the trace zeroed (θ alone), and every
    task k with its own trace (``saved_traces[k]``, saved at the end of task k; tasks not yet
    learned: the latest)."""
    zeroed = [torch.zeros_like(head.hebb) for head in dhp_heads(model)]
    return [lambda k: zeroed, lambda k: saved_traces[min(k, task_id)]]


def trace_state(model: nn.Module) -> dict:
    r"""The first DHP head's plasticity summary and its trace's largest magnitude."""
    head = dhp_heads(model)[0]
    return {**head.plasticity_summary(), "max_abs_hebb": head.hebb.abs().max().item()}
