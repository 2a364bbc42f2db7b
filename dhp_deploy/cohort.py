r"""Several runs of one protocol trained at once as one vectorised model (the way a GPU pays off).

A batch-64 step of a 270k-parameter MLP leaves a GPU nearly idle: kernel launches, not arithmetic,
bound it. A cohort of ``K`` runs that share the network's shape and the protocol (typically the
seeds of one grid cell; their methods and strengths may differ) stacks their networks
(``torch.func.stack_module_state``): every parameter, and the DHP trace, becomes one ``(K, ...)``
tensor, and each run's own parameters become views of their slice. A step is then the one-run lean
step under ``torch.vmap`` (:func:`dhp_deploy.lean_step.stacked_gradients`: each matmul one batched
matmul, the launches of one step for all ``K``) and one SGD update of the stacked tensors; on a
GPU that step replays as one CUDA graph per task (:mod:`dhp_deploy.cuda_graph`), as a run's does.

Everything else stays each run's own :class:`~dhp_deploy.train.TrainingRun` code, reading its
views: its own batch order and data (its seed's), regulariser (whose penalty and SI's path integral
run per run, on views), evaluation, checkpoints after every epoch, metrics and exact resume. A run
of a cohort therefore writes the same files as a run trained alone, and equals it to float
rounding (the batched matmuls sum in another order); a run that diverges, or whose strength is
unstable, leaves the cohort with its error and the others train on. Its ``train_s`` is its share
of the cohort's training time (the time divided by the runs trained); ``timings["cohort_runs"]``
records how many runs trained together.
"""

import json
import time
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.func import stack_module_state

from dhp_deploy.cuda_graph import GraphedSteps
from dhp_deploy.lean_step import stacked_gradients
from dhp_deploy.tasks import batches
from dhp_deploy.train import TrainingError, TrainingRun, target_map, derived_generator

__all__ = ["Cohort"]


class Cohort:
    r"""``runs`` (started or resumed :class:`TrainingRun`, all at the same position) trained in
    lockstep. :meth:`run` trains them to the end and returns ``{run: metrics or TrainingError}``;
    :meth:`epochs` yields after every epoch. Raises :class:`TrainingError` when the runs cannot
    train together (another network shape, protocol, position or device; momentum)."""

    def __init__(self, runs: list[TrainingRun]) -> None:
        if not runs:
            raise TrainingError("a cohort needs at least one run")
        _check_compatible(runs)
        self.runs, self.outcomes = list(runs), {}
        first = self.runs[0]
        # On a GPU the stacked step replays as one CUDA graph per task, as a run's step does.
        self.graphs = GraphedSteps(first.device.type == "cuda" and first.graphs.enabled,
                                   first.config.batch_size, first.log)
        self._stack()

    def _stack(self) -> None:
        r"""One ``(K, ...)`` tensor per parameter and buffer; each run's tensors become views of
        its slice (``.data``: the Parameter objects stay, which the regularisers key on)."""
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

    def run(self) -> dict:
        r"""Train every run to the end; ``{run: its metrics.json content or its TrainingError}``."""
        for _ in self.epochs():
            pass
        for run in self.runs:
            self.outcomes[run] = run.write_metrics()
        return self.outcomes

    def epochs(self) -> Iterator[None]:
        started = time.perf_counter()
        epochs_left = {run: run.epochs_left() for run in self.runs}
        epochs_done = 0
        while self.runs and not self.runs[0].position["finished"]:
            positions = self._each(lambda run: run.begin_epoch())
            if not self.runs:
                break
            task_id, epoch = positions[0]
            if epoch == 0:
                self.graphs.clear()  # the regularisers' state may live in new tensors now
            totals, seconds = self.train_epoch(task_id, epoch)
            sums = totals.tolist()
            share = seconds / len(self.runs)
            epochs_done += 1
            sums_of = dict(zip(self.runs, sums))
            for run in self.runs:
                run.progress.timings["cohort_runs"] = max(
                    run.progress.timings.get("cohort_runs", 1), len(sums))
            self._each(lambda run: _finish(run, task_id, epoch, *sums_of[run], share))
            for run in self.runs:
                record = run.progress.epochs[-1]
                run.log_epoch(record["loss"], record["train_acc"], started, epochs_done,
                              epochs_left[run])
            yield

    def _each(self, step) -> list:
        r"""``step(run)`` for each run; a run whose step raises a TrainingError leaves the cohort
        with it (the others are restacked and go on)."""
        results, dropped = [], False
        for run in list(self.runs):
            try:
                results.append(step(run))
            except TrainingError as err:
                run.log(str(err))
                self.outcomes[run] = err
                self.runs.remove(run)
                dropped = True
        if dropped and self.runs:
            self._stack()
        return results

    def train_epoch(self, task_id: int, epoch: int) -> tuple[torch.Tensor, float]:
        r"""One epoch of every run, in lockstep, without waiting for the device; returns each
        run's ``[loss sum, correct]`` (a ``(K, 2)`` tensor on the device) and the seconds spent."""
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
        for run in self.runs:
            run.steps_this_process += steps
        return totals, time.perf_counter() - started

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
        torch._foreach_add_(self.params, stacked, alpha=-self.runs[0].config.lr)
        for run in self.runs:  # the views of each run's η: as its one-run step bounds it
            run.bound_eta()
        for index, (run, (own, _)) in enumerate(zip(self.runs, per_run)):
            for param, grad in zip(run.parameters, stacked):  # as the one-run step leaves them
                param.grad = grad[index]
            run.regularizer.after_sgd_step(run.model, own, run.config.lr)


def _finish(run: TrainingRun, task_id: int, epoch: int, loss_sum: float, correct: float,
            seconds: float) -> None:
    loss, accuracy = run.epoch_totals(task_id, epoch, loss_sum, correct, seconds)
    run.finish_epoch(task_id, epoch, loss, accuracy, seconds)


def stack_key(run: TrainingRun) -> str:
    r"""What runs of one cohort must share: the network, the protocol, the data's sizes (which
    differ between seeds of Imbalanced Permuted MNIST), the device and the position."""
    tasks = run.benchmark.tasks
    return json.dumps([run.config_json["model"], run.config.epochs, run.config.batch_size,
                       run.config.lr, run.config.eta_bound, str(run.device),
                       run.benchmark.scenario,
                       [(len(task.y_train), list(task.classes)) for task in tasks],
                       run.position], sort_keys=True, default=str)


def _check_compatible(runs: list[TrainingRun]) -> None:
    r"""Raise a one-line :class:`TrainingError` unless ``runs`` can train as one stacked model."""
    first = runs[0]
    shape = stack_key
    for run in runs:
        if not run.lean or run.config.momentum != 0 or run.replicas.distributed:
            raise TrainingError(f"{run.run_dir}: a cohort trains with the lean plain-SGD step "
                                f"on one process (no momentum, no autograd-only network)")
        if shape(run) != shape(first):
            raise TrainingError(f"{run.run_dir} cannot train in a cohort with {first.run_dir}: "
                                f"their network, protocol, data sizes, device or position differ")
        if sum(run is other for other in runs) > 1:
            raise TrainingError(f"{run.run_dir} is in the cohort twice")
