r"""The training loop, written once: the epochs of ``K`` runs in lockstep (``K = 1``: dhp-train).

Each epoch: every run's ``begin_epoch`` (trace reset, the regulariser's step before a task, the
stability check), the stepper's epoch (:mod:`dhp_deploy.steps`: one run's steps, or ``K`` runs
stacked), every run's ``end_epoch`` (the end of its task, its record, its checkpoint) and its
progress line. The runs hold their own state (:class:`~dhp_deploy.train.TrainingRun`); the loop
holds only which runs are still training.

A run that fails (:class:`~dhp_deploy.stability.TrainingError`: diverged, unstable strength)
either stops the loop with its error (``keep_going=False``, one run) or leaves it with the error
as its outcome while the others train on (``keep_going=True``, a cohort).
"""

import time
from typing import Iterator

from dhp_deploy.stability import TrainingError

__all__ = ["Loop"]


class Loop:
    r"""``runs`` (all at the same position) trained by ``steps`` to the end."""

    def __init__(self, runs: list, steps, keep_going: bool) -> None:
        self.runs, self.steps, self.keep_going = list(runs), steps, keep_going
        self.outcomes = {}  # run → its metrics.json content or its TrainingError

    def run(self) -> dict:
        r"""Train every run to the end, write its metrics; ``{run: metrics or TrainingError}``."""
        for _ in self.epochs():
            pass
        for run in self.runs:
            self.outcomes[run] = run.write_metrics()
        return self.outcomes

    def epochs(self) -> Iterator[None]:
        r"""Train, yielding after every epoch (each run checkpointed): a caller may stop between
        epochs, or step several loops in turn (benchmarks/bench_train.py)."""
        started, epochs_done = time.perf_counter(), 0
        epochs_left = {run: run.epochs_left() for run in self.runs}
        while self.runs and not self.runs[0].position["finished"]:
            positions = self._each(lambda run: run.begin_epoch())
            if not self.runs:
                break
            task_id, epoch = positions[0]
            if epoch == 0:
                self.steps.begin_task()
            sums, seconds = self.steps.train_epoch(task_id, epoch)
            share = seconds / len(self.runs)  # a cohort's run: its share of the time
            sums_of = dict(zip(self.runs, sums))
            self._each(lambda run: run.end_epoch(task_id, epoch, *sums_of[run], share))
            epochs_done += 1
            for run in self.runs:
                run.log_epoch(started, epochs_done, epochs_left[run])
            yield

    def _each(self, step) -> list:
        r"""``step(run)`` for each run. A TrainingError: raised (one run), or the run leaves the
        loop with it and the others are restacked and go on (``keep_going``)."""
        results, dropped = [], False
        for run in list(self.runs):
            try:
                results.append(step(run))
            except TrainingError as err:
                if not self.keep_going:
                    raise
                run.log(str(err))
                self.outcomes[run] = err
                self.runs.remove(run)
                dropped = True
        if dropped and self.runs:
            self.steps.restack(self.runs)
        return results
