r"""Accuracy of a model on every task of a benchmark, and what the DHP trace does to it."""

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.layer import DHPSoftmax
from dhp_deploy.network import predicted_classes
from dhp_deploy.tasks import Benchmark

__all__ = ["EVAL_BATCH", "task_heads", "dhp_heads", "evaluate", "trace_evaluations"]

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
    was_training = model.training
    model.eval()
    tasks = benchmark.tasks
    heads = dhp_heads(model) if traces is not None else []
    kept = [head.hebb.clone() for head in heads]  # copied back in place: a cohort's are views
    correct = torch.zeros(len(tasks), dtype=torch.int64, device=tasks[0].y_train.device)
    try:
        for index, (task, head) in enumerate(zip(tasks, task_heads(benchmark, None))):
            for layer, trace in zip(heads, traces(index) if traces is not None else []):
                layer.hebb.copy_(trace)
            x = replicas.shard(getattr(task, f"x_{split}"))
            y = replicas.shard(getattr(task, f"y_{split}"))
            for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
                correct[index] += (predicted_classes(model(xb), head) == yb).sum()
    finally:
        for layer, trace in zip(heads, kept):
            layer.hebb.copy_(trace)
        model.train(was_training)
    counts = replicas.all_reduce(correct).tolist()
    return [count / max(len(getattr(task, f"y_{split}")), 1) for count, task in zip(counts, tasks)]


def trace_evaluations(model: nn.Module, benchmark: Benchmark, replicas: Replicas,
                      saved_traces: list, task_id: int) -> tuple[list, list, dict]:
    r"""What the Hebbian trace does to the accuracies after task ``task_id``: every task with the
    trace zeroed (θ alone), every task k with its own trace (``saved_traces[k]``, saved at the end
    of task k; tasks not yet learned: the latest), and the trace's state."""
    heads = dhp_heads(model)
    zeroed = [torch.zeros_like(head.hebb) for head in heads]
    zeroed_row = evaluate(model, benchmark, "test", replicas, traces=lambda k: zeroed)
    own_row = evaluate(model, benchmark, "test", replicas,
                       traces=lambda k: saved_traces[min(k, task_id)])
    state = {**heads[0].plasticity_summary(), "max_abs_hebb": heads[0].hebb.abs().max().item()}
    return zeroed_row, own_row, state
