r"""Several runs of one protocol trained at once as one vectorised model (the way a GPU pays off).

A batch-64 step of a 270k-parameter MLP leaves a GPU nearly idle: kernel launches, not arithmetic,
bound it. A cohort of ``K`` runs that share the network's shape and the protocol (typically the
seeds of one grid cell; their methods and strengths may differ) trains them in the one training
loop (:mod:`dhp_deploy.loop`) with the stacked stepper (:class:`dhp_deploy.steps.StackedSteps`):
every parameter, and the DHP trace, one ``(K, ...)`` tensor; each matmul of a step one batched
matmul; on a GPU one CUDA graph per task.

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

from dhp_deploy.config import model_arguments
from dhp_deploy.loop import Loop
from dhp_deploy.steps import StackedSteps
from dhp_deploy.train import TrainingError, TrainingRun

__all__ = ["Cohort", "stack_key"]


class Cohort(Loop):
    r"""``runs`` (started or resumed :class:`TrainingRun`, all at the same position) trained in
    lockstep. :meth:`run` trains them to the end and returns ``{run: metrics or TrainingError}``;
    :meth:`epochs` yields after every epoch. Raises :class:`TrainingError` when the runs cannot
    train together (another network shape, protocol, position or device; momentum)."""

    def __init__(self, runs: list[TrainingRun]) -> None:
        if not runs:
            raise TrainingError("a cohort needs at least one run")
        _check_compatible(runs)
        super().__init__(runs, StackedSteps(runs), keep_going=True)


def stack_key(run: TrainingRun) -> str:
    r"""What runs of one cohort must share: the network, the protocol, the data's sizes (which
    differ between seeds of Imbalanced Permuted MNIST), the device and the position."""
    tasks = run.benchmark.tasks
    return json.dumps([model_arguments(run.config_json), run.config.epochs, run.config.batch_size,
                       run.config.lr, run.config.eta_bound, str(run.device),
                       run.benchmark.scenario,
                       [(len(task.y_train), list(task.classes)) for task in tasks],
                       run.position], sort_keys=True, default=str)


def _check_compatible(runs: list[TrainingRun]) -> None:
    r"""Raise a one-line :class:`TrainingError` unless ``runs`` can train as one stacked model."""
    first = runs[0]
    for run in runs:
        if not run.lean or run.config.momentum != 0 or run.replicas.distributed:
            raise TrainingError(f"{run.run_dir}: a cohort trains with the lean plain-SGD step "
                                f"on one process (no momentum, no autograd-only network)")
        if stack_key(run) != stack_key(first):
            raise TrainingError(f"{run.run_dir} cannot train in a cohort with {first.run_dir}: "
                                f"their network, protocol, data sizes, device or position differ")
        if sum(run is other for other in runs) > 1:
            raise TrainingError(f"{run.run_dir} is in the cohort twice")
