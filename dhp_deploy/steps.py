r"""How the runs of the training loop (:mod:`dhp_deploy.loop`) take an epoch's steps.

Two steppers with one interface: :class:`OneRunSteps` moves one run (the lean step where the
network allows it, else autograd; torch's SGD for momentum; data-parallel collectives; a CUDA
graph per task on a GPU), :class:`StackedSteps` moves ``K`` runs stacked as one vectorised model
(the cohort, :mod:`dhp_deploy.cohort`). A stepper reads each run's state (model, regulariser,
configuration) and leaves the epoch's bookkeeping to the run; :func:`sgd_update` is the one
writer of a plain-SGD update both share.

Interface: ``begin_task()`` before a task's first step (a regulariser's state may live in new
tensors: captured graphs are dropped); ``train_epoch(task_id, epoch)`` returns each of its runs'
``(loss sum, correct)``, in order, and the seconds spent; ``restack(runs)`` after runs left the
loop (the runs still training).
"""

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import stack_module_state

from dhp_deploy.cuda_graph import GraphedSteps
from dhp_deploy.lean_step import lean_gradients, stacked_gradients
from dhp_deploy.network import task_logits
from dhp_deploy.tasks import batches, seeded_generator

__all__ = ["OneRunSteps", "StackedSteps", "sgd_update", "derived_generator", "target_map"]


def derived_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    r"""A CPU generator seeded from ``(seed, purpose, keys)`` alone (sha256: unrelated streams)."""
    return seeded_generator("dhp-train", seed, purpose, *keys)


def target_map(head: Optional[Tensor], num_classes: int, device) -> Optional[Tensor]:
    r"""Global class id → position within the task's ``head`` (−1 for classes outside it); None
    for no head (all classes: the targets are the labels)."""
    if head is None:
        return None
    positions = torch.full((num_classes,), -1, dtype=torch.int64, device=device)
    positions[head] = torch.arange(len(head), device=device)
    return positions


@torch.no_grad()
def sgd_update(params: list[Tensor], grads: list[Tensor], lr: float) -> None:
    r"""``θ ← θ − lr·g``: torch SGD's own foreach update without its per-call overhead."""
    if params:  # none left when the penalised-SGD kernel moved them all (a plain net)
        torch._foreach_add_(params, grads, alpha=-lr)


class OneRunSteps:
    r"""The steps of one run, as ``dhp-train`` takes them."""

    def __init__(self, run) -> None:
        self.run = run
        # On a GPU the lean plain-SGD step replays as one CUDA graph per task (launches, not
        # arithmetic, bound a batch-64 step there).
        self.graphs = GraphedSteps(run.cuda_graphs, run.config.batch_size, run.log)

    def begin_task(self) -> None:
        self.graphs.clear()

    def restack(self, runs) -> None:
        pass  # one run: when it leaves, the loop ends

    def train_epoch(self, task_id: int, epoch: int) -> tuple[list, float]:
        r"""One pass over the task's training set; returns ``([(loss sum, correct)], seconds)``."""
        run = self.run
        task, head = run.benchmark.tasks[task_id], run.heads[task_id]
        started = time.perf_counter()
        targets_of = target_map(head, run.benchmark.num_classes, run.device)
        generator = derived_generator(run.config.seed, "batches", task_id, epoch)
        # [loss sum, correct], summed on device (no per-step host sync), then over the ranks.
        totals = torch.zeros(2, dtype=torch.float64, device=run.device)
        loss_sum, correct = totals[0], totals[1]  # views: one in-place op each per step
        size = run.config.batch_size
        count = len(task.y_train)
        sizes = [min(size, count - start) for start in range(0, count, size)]
        part = run.replicas.shard if run.replicas.distributed else None
        for (xb, yb), global_size in zip(batches(task.x_train, task.y_train, size, generator,
                                                 part=part), sizes):
            loss, hits = self.graphs(task_id, lambda x, y: self.step(x, y, head, targets_of,
                                                                     global_size), xb, yb)
            loss_sum.add_(loss, alpha=global_size)
            correct.add_(hits)
            run.steps_this_process += 1
            if run.on_step is not None:
                run.on_step(run.steps_this_process)
        sums = run.replicas.all_reduce(totals).tolist()
        return [sums], time.perf_counter() - started

    def step(self, xb: Tensor, yb: Tensor, head: Optional[Tensor], targets_of: Optional[Tensor],
             global_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        r"""One SGD step on ``loss = ce + penalty``; returns the detached ce and the hit count.

        The lean step (:mod:`dhp_deploy.lean_step`) where the model allows it, else autograd.
        Data-parallel, ``(xb, yb)`` is this rank's slice of a batch of ``global_size`` rows, and
        the ce and hits returned are the slice's share (the penalty is every rank's: not reduced).
        """
        run = self.run
        if not run.lean:
            return self.autograd_step(xb, yb, head, targets_of)
        targets = yb if head is None else targets_of.index_select(0, yb)
        task_grads, task_loss, _, hits = lean_gradients(run.model, xb, yb, head, targets,
                                                        run.replicas, global_size,
                                                        run.parameters)
        if run.config.momentum == 0:  # the penalised weights may move with their penalty
            grads, moved = run.regularizer.penalised_sgd(run.model, task_grads, run.config.lr)
            rest = [param for param in run.parameters if id(param) not in moved]
            sgd_update(rest, [grads[id(param)] for param in rest], run.config.lr)
        else:
            grads = run.regularizer.gradients_with_penalty(run.model, task_grads)
        for param in run.parameters:  # as backward() leaves them: SI reads them after the update
            param.grad = grads[id(param)]
        if run.config.momentum == 0:
            run.bound_eta()
            run.regularizer.after_sgd_step(run.model, task_grads, run.config.lr)
        else:
            run.optimizer.step()
            run.bound_eta()
            run.regularizer.after_step(run.model)
        return task_loss, hits

    def autograd_step(self, xb: Tensor, yb: Tensor, head: Optional[Tensor],
                      targets_of: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        r"""The generic step: the model's forward, ``loss.backward()``, the optimiser."""
        run = self.run
        logits = run.model(xb, yb)  # the DHP head sees the labels: its trace updates
        if head is not None:
            logits, targets = task_logits(logits, head), targets_of[yb]
        else:
            targets = yb
        task_loss = F.cross_entropy(logits, targets)
        loss = task_loss + run.regularizer.penalty(run.model)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.bound_eta()
        run.regularizer.after_step(run.model)
        return task_loss.detach(), (logits.detach().argmax(1) == targets).sum()


class StackedSteps:
    r"""The steps of ``K`` runs of one protocol as one vectorised model.

    Every parameter, and the DHP trace, becomes one ``(K, ...)`` tensor, each run's own
    parameters views of their slice (``torch.func.stack_module_state``); a step is the one-run
    lean step under ``torch.vmap`` (:func:`dhp_deploy.lean_step.stacked_gradients`) and one SGD
    update of the stacked tensors. Each run keeps its own batch order, data and regulariser.
    """

    def __init__(self, runs) -> None:
        first = runs[0]
        self.lr = first.config.lr
        # On a GPU the stacked step replays as one CUDA graph per task, as a run's step does.
        self.graphs = GraphedSteps(first.cuda_graphs, first.config.batch_size, first.log)
        self.restack(runs)

    def begin_task(self) -> None:
        self.graphs.clear()

    def restack(self, runs) -> None:
        r"""One ``(K, ...)`` tensor per parameter and buffer; each run's tensors become views of
        its slice (``.data``: the Parameter objects stay, which the regularisers key on)."""
        self.runs = list(runs)
        self.graphs.clear()  # the step's tensors move
        models = [run.model for run in self.runs]
        params, buffers = stack_module_state(models)
        names = [name for name, _ in models[0].named_parameters()]
        self.params = [params[name].detach() for name in names]
        self.hebb = buffers.get("head.hebb")  # the DHP trace, None for a plain head
        for index, model in enumerate(models):
            for name, param in model.named_parameters():
                param.data = self.params[names.index(name)][index]
            for name, buffer in model.named_buffers():
                buffer.data = buffers[name][index]

    def train_epoch(self, task_id: int, epoch: int) -> tuple[list, float]:
        r"""One epoch of every run, in lockstep, without waiting for the device; returns each
        run's ``(loss sum, correct)`` and the seconds spent."""
        first = self.runs[0]
        head = first.heads[task_id]
        targets_of = target_map(head, first.benchmark.num_classes, first.device)
        streams = [batches(run.benchmark.tasks[task_id].x_train,
                           run.benchmark.tasks[task_id].y_train, run.config.batch_size,
                           derived_generator(run.config.seed, "batches", task_id, epoch))
                   for run in self.runs]
        totals = torch.zeros(len(self.runs), 2, dtype=torch.float64, device=first.device)
        started, steps = time.perf_counter(), 0
        for pairs in zip(*streams):
            x = torch.stack([xb for xb, _ in pairs])
            y = torch.stack([yb for _, yb in pairs])
            losses, hits = self.graphs(task_id, lambda x, y: self.step(x, y, head, targets_of),
                                       x, y)
            totals[:, 0].add_(losses, alpha=y.shape[1])
            totals[:, 1].add_(hits)
            steps += 1
        sums = totals.tolist()
        for run in self.runs:
            run.steps_this_process += steps
            run.progress.timings["cohort_runs"] = max(run.progress.timings.get("cohort_runs", 1),
                                                      len(self.runs))
        return sums, time.perf_counter() - started

    def step(self, x: Tensor, y: Tensor, head: Optional[Tensor],
             targets_of: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        r"""One SGD step of every run on its batch (``x``: ``(K, B, ...)``, ``y``: ``(K, B)``);
        returns each run's cross-entropy and hit count."""
        targets = y if head is None else targets_of[y]
        grads, losses, _, hits = stacked_gradients(self.params, self.hebb, x, y, head, targets)
        self._update(grads)
        return losses, hits

    @torch.no_grad()
    def _update(self, task_grads: list) -> None:
        r"""Each run's penalty (on its views), one plain-SGD update of the stacked tensors, then
        each regulariser's step after it (SI's path integral): the one-run lean step's order."""
        per_run = []
        for index, run in enumerate(self.runs):
            own = {id(param): grad[index] for param, grad in zip(run.parameters, task_grads)}
            with_penalty = run.regularizer.gradients_with_penalty(run.model, own)
            per_run.append((own, [with_penalty[id(param)] for param in run.parameters]))
        # Stacked again only where some run's penalty changed a gradient (not for Finetune).
        stacked = [grad if all(grads[j] is own[id(run.parameters[j])]
                               for run, (own, grads) in zip(self.runs, per_run))
                   else torch.stack([grads[j] for _, grads in per_run])
                   for j, grad in enumerate(task_grads)]
        sgd_update(self.params, stacked, self.lr)
        for run in self.runs:  # the views of each run's η: as its one-run step bounds it
            run.bound_eta()
        for index, (run, (own, _)) in enumerate(zip(self.runs, per_run)):
            for param, grad in zip(run.parameters, stacked):  # as the one-run step leaves them
                param.grad = grad[index]
            run.regularizer.after_sgd_step(run.model, own, run.config.lr)
