r"""Continual training: tasks in sequence, consolidation, evaluation, checkpoints, exact resume.

For each task: ``epochs`` passes of shuffled mini-batches, each step ``loss = ce + penalty`` with the
cross-entropy over the task's classes (scenario ``"task"``: multi-head, targets remapped to positions
within the task) or over all classes (``"class"``, ``"domain"``). The DHP head gets the labels so its
Hebbian trace updates; it is zeroed at a task's start only with ``trace_reset``. After the task's
last epoch: the regulariser's end-of-task step, then every task's test set is evaluated (one row of
the accuracy matrix). The loop itself is :mod:`dhp_deploy.loop`, the steps :mod:`dhp_deploy.steps`.

A checkpoint is written after every epoch (and once before training). Its ``position`` is the last
completed epoch, ``{"task": t, "epoch": e}`` (``e = -1``: nothing of task t done yet); the end-of-task
step and evaluation of task t happen before the checkpoint of its last epoch. Every random draw comes
from a ``torch.Generator`` derived from ``(seed, purpose, task, epoch)``, so a resumed run needs only
the position and the saved states to continue bit for bit like an uninterrupted one.

Data-parallel (launched by ``torchrun``, :mod:`dhp_deploy.distributed`): every rank runs this loop
on its slice of each global batch, with the lean step's collectives; rank 0 alone writes the run's
files, and every rank computes the same weights, trace, accuracies and checks.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from dhp_deploy.tasks import Benchmark
from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.run_dir import (CHECKPOINT_NAME, CONFIG_NAME, CheckpointError, atomic_write_json,
                                load_checkpoint, save_checkpoint)
from dhp_deploy.metrics import average_accuracies, format_duration, run_metrics, write_run_metrics
from dhp_deploy import fused_head
from dhp_deploy.lean_step import supports_lean_step
from dhp_deploy.loop import Loop
from dhp_deploy.steps import OneRunSteps, derived_generator
from dhp_deploy.stability import (TrainingDiverged, TrainingError, UnstableStrength,
                                  check_finite, check_stable)
from dhp_deploy.evaluation import (dhp_heads, evaluate, evaluate_with_traces, task_heads,
                                   trace_diagnostic_sets, trace_state)
from dhp_deploy.config import TrainConfig, build_model
from dhp_deploy.regularizers import build_regularizer

__all__ = ["TrainConfig", "TrainingError", "TrainingDiverged", "UnstableStrength", "TrainingRun",
           "start_or_resume"]


@dataclass
class Progress:
    r"""What a run has achieved so far (saved as the checkpoint's ``metrics``)."""

    acc_matrix: list = field(default_factory=list)  # rows of test accuracies, one per task done
    val_acc_matrix: list = field(default_factory=list)  # the same on validation data, if any
    # DHP heads only, the same layout as acc_matrix: the same weights with the trace zeroed (θ
    # alone), and each task k with the trace saved at the end of task k (tasks not yet learned:
    # the current trace); per task, the trace's state (TrainingRun.end_task).
    acc_matrix_trace_zeroed: list = field(default_factory=list)
    acc_matrix_own_trace: list = field(default_factory=list)
    trace_diagnostics: list = field(default_factory=list)
    epochs: list = field(default_factory=list)  # per epoch: task, epoch, loss, train_acc, seconds
    timings: dict = field(default_factory=lambda: {"train_s": 0.0, "consolidate_s": 0.0,
                                                   "evaluate_s": 0.0, "samples": 0})


class TrainingRun:
    r"""One run's state: the model, optimiser, regulariser, position and progress, and what it does
    between the loop's steps (:mod:`dhp_deploy.loop`, :mod:`dhp_deploy.steps`).

    Build with :meth:`start` (fresh) or :meth:`resume` (from a checkpoint payload), then call
    :meth:`run`. ``log`` receives one progress line per epoch (and one before training when
    the CPU kernels must be compiled first); ``on_step`` is called with the number
    of optimiser steps taken in this process after each step (a test hook). ``replicas``: this
    process's rank among the data-parallel processes of the run (default: the only one).
    """

    def __init__(self, config: TrainConfig, benchmark: Benchmark, run_dir, device,
                 log: Optional[Callable[[str], None]] = None,
                 on_step: Optional[Callable[[int], None]] = None, lean: bool = True,
                 cuda_graphs: bool = True, replicas: Replicas = SINGLE) -> None:
        self.config, self.benchmark, self.run_dir = config, benchmark, Path(run_dir)
        self.device = torch.device(device)
        self.log, self.on_step = log or (lambda line: None), on_step
        self.replicas = replicas
        self.config_json = {**config.to_json(benchmark), **replicas.describe()}
        torch.manual_seed(config.seed)  # the initial weights
        self.model = build_model(self.config_json).to(self.device).train()
        self._optimizer: Optional[torch.optim.SGD] = None  # built on first use (see optimizer)
        self.regularizer = build_regularizer(config.method, **config.regularizer_arguments())
        self.parameters = list(self.model.parameters())
        # The lean step computes the same gradients with far less overhead; autograd serves any
        # other model (lean=False forces it, e.g. to compare the two).
        self.lean = lean and supports_lean_step(self.model)
        if self.lean and self.device.type == "cpu":
            fused_head.load(self.log)  # its steps use the kernels: a build is not training time
        if replicas.distributed and not self.lean:
            raise TrainingError("data-parallel training needs the lean step (a Linear+ReLU trunk "
                                "and a DHP-Softmax or plain head), which synchronises the trace")
        # On a GPU its lean plain-SGD steps may replay as one CUDA graph per task
        # (dhp_deploy.steps); cuda_graphs=False keeps every step eager. Not data-parallel: the
        # collectives stay outside graphs.
        self.cuda_graphs = (cuda_graphs and self.lean and self.device.type == "cuda"
                            and config.momentum == 0 and not replicas.distributed)
        self.heads = task_heads(benchmark, self.device)
        self.position = {"task": 0, "epoch": -1, "finished": False}
        self.progress = Progress()
        self.saved_traces: list[list[Tensor]] = []  # per task done: each DHP head's trace then
        self.bounded_etas = [head.eta for head in dhp_heads(self.model)] if config.eta_bound else []
        self.steps_this_process = 0

    @property
    def optimizer(self) -> torch.optim.SGD:
        r"""torch's SGD, built when first needed: by the autograd step, momentum, or a checkpoint
        holding optimiser state. The lean plain-SGD step updates the weights itself and SGD without
        momentum has no state, so such a run never builds it: torch.optim's first call imports
        torch._dynamo, 1.8 s of a 20 s Split MNIST run's start-up."""
        if self._optimizer is None:
            self._optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr,
                                              momentum=self.config.momentum, foreach=True)
        return self._optimizer

    @classmethod
    def start(cls, config, benchmark, run_dir, device="cpu", **hooks) -> "TrainingRun":
        run = cls(config, benchmark, run_dir, device, **hooks)
        if run.replicas.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run.run_dir / CONFIG_NAME, run.config_json)
        run.save()  # a resumable, loadable starting point before any step
        return run

    @classmethod
    def resume(cls, payload: dict, benchmark, run_dir, device="cpu", **hooks) -> "TrainingRun":
        config = TrainConfig.from_json(payload["config"])
        run = cls(config, benchmark, run_dir, device, **hooks)
        run.model.load_state_dict(payload["model"])
        if payload["optimizer"] and payload["optimizer"]["state"]:  # else: a fresh SGD's state
            run.optimizer.load_state_dict(payload["optimizer"])
        run.regularizer.load_state_dict(payload["regularizer"])
        run.position = dict(payload["position"])
        run.progress = Progress(**payload["metrics"])
        run.saved_traces = [[trace.to(run.device) for trace in traces]
                            for traces in payload.get("saved_traces", [])]
        _restore_rng(payload["rng"])
        if run.replicas.is_main:  # it may continue with another world size than it started with
            atomic_write_json(run.run_dir / CONFIG_NAME, run.config_json)
        return run

    # ------------------------------------------------------------------ between the steps

    def run(self) -> dict:
        r"""Train from the saved position to the end; write the metrics files; return metrics.json.
        Raises :class:`TrainingError` when the run diverges or its strength is unstable."""
        return Loop([self], OneRunSteps(self), keep_going=False).run()[self]

    def epochs(self) -> Iterator[None]:
        r"""Train from the saved position to the end, yielding after each epoch (checkpointed):
        benchmarks/bench_train.py steps several runs' epochs in turn, so noise hits them alike."""
        return Loop([self], OneRunSteps(self), keep_going=False).epochs()

    def begin_epoch(self) -> tuple[int, int]:
        r"""The next epoch's ``(task_id, epoch)``; at a task's start, the trace reset (with
        ``trace_reset``), the regulariser's step before it and the stability check (raises
        :class:`UnstableStrength`)."""
        task_id, epoch = self._next_position()
        if epoch == 0 and task_id > 0 and self.config.trace_reset:
            for head in dhp_heads(self.model):  # in place: a cohort's traces are views
                head.reset_trace()
        if epoch == 0:
            self.regularizer.before_task(self.model)
            self._check_stable(task_id)
        return task_id, epoch

    def end_epoch(self, task_id: int, epoch: int, loss_sum: float, correct: float,
                  seconds: float) -> None:
        r"""After an epoch's steps (``loss_sum`` and ``correct`` over its samples): the checks
        (raises :class:`TrainingDiverged`), the end of its task if it was the last epoch, the
        new position and the epoch's record, then the checkpoint."""
        count = max(len(self.benchmark.tasks[task_id].y_train), 1)
        loss, accuracy = loss_sum / count, correct / count
        self._check_finite(loss, task_id, epoch)
        self.progress.timings["train_s"] += seconds
        self.progress.timings["samples"] += count
        if epoch == self.config.epochs - 1:
            self.end_task(task_id)
        self.position = {"task": task_id, "epoch": epoch,
                         "finished": (task_id == len(self.benchmark.tasks) - 1
                                      and epoch == self.config.epochs - 1)}
        self.progress.epochs.append({"task": task_id, "epoch": epoch, "loss": loss,
                                     "train_acc": accuracy, "seconds": seconds})
        self.save()

    def _next_position(self) -> tuple[int, int]:
        task_id, epoch = self.position["task"], self.position["epoch"] + 1
        return (task_id + 1, 0) if epoch == self.config.epochs else (task_id, epoch)

    def epochs_left(self) -> int:
        done = self.position["task"] * self.config.epochs + self.position["epoch"] + 1
        return len(self.benchmark.tasks) * self.config.epochs - done

    @torch.no_grad()
    def bound_eta(self) -> None:
        r"""With ``eta_bound``, η back into [0, 1] after an update (projected SGD): η stays the
        parameter every exporter reads, and inside the bounds it learns exactly as unbounded."""
        for eta in self.bounded_etas:
            eta.clamp_(0.0, 1.0)

    def end_task(self, task_id: int) -> None:
        r"""The regulariser's end-of-task step, then one row of test (and val) accuracies, and
        for a DHP head the trace's diagnostics in the same pass over the test sets."""
        task, started = self.benchmark.tasks[task_id], time.perf_counter()
        curvature = self.regularizer.max_curvature()  # the penalty this task trained under
        generator = derived_generator(self.config.seed, "consolidation", task_id)
        self.regularizer.after_task(self.model, task.x_train, self.heads[task_id], generator,
                                    self.replicas)
        consolidated = time.perf_counter()
        diagnostics = self._trace_diagnostic_sets(task_id)
        rows, seconds = evaluate_with_traces(self.model, self.benchmark, [None] + diagnostics,
                                             "test", self.replicas)
        self.progress.acc_matrix.append(rows[0])
        timings = self.progress.timings
        timings["consolidate_s"] += consolidated - started
        timings["evaluate_s"] += seconds[0]
        if any(len(t.y_val) for t in self.benchmark.tasks):
            val_started = time.perf_counter()
            self.progress.val_acc_matrix.append(evaluate(self.model, self.benchmark, "val",
                                                         self.replicas))
            timings["evaluate_s"] += time.perf_counter() - val_started
        if dhp_heads(self.model):  # the diagnostics' share of the evaluation is kept apart
            timings["trace_diagnostics_s"] = (timings.get("trace_diagnostics_s", 0.0)
                                              + sum(seconds[1:]))
        if diagnostics:
            self.progress.acc_matrix_trace_zeroed.append(rows[1])
            self.progress.acc_matrix_own_trace.append(rows[2])
            self.progress.trace_diagnostics.append({
                **trace_state(self.model), "lr_max_curvature": self.config.lr * curvature})

    def _trace_diagnostic_sets(self, task_id: int) -> list:
        r"""What the Hebbian trace does to the accuracies after task ``task_id``, as
        evaluation entries (:func:`trace_diagnostic_sets`): every task with the trace zeroed
        (θ alone) and with its own trace (saved at the end of that task, kept in the
        checkpoint). Empty for a plain head, or for a run resumed from a checkpoint written
        before these diagnostics existed."""
        if not dhp_heads(self.model) or len(self.saved_traces) != task_id:
            return []
        self.saved_traces.append([head.hebb.detach().clone() for head in dhp_heads(self.model)])
        return trace_diagnostic_sets(self.model, self.saved_traces, task_id)

    # ------------------------------------------------------------------ state on disk

    def save(self) -> None:
        r"""The checkpoint, written by rank 0 only (every rank holds the same state)."""
        if not self.replicas.is_main:
            return
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, {
            "config": self.config_json,
            "benchmark": _benchmark_summary(self.benchmark),
            "model": _own_storage(self.model.state_dict()),
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "regularizer": self.regularizer.state_dict(),
            "rng": _rng_state(self.device),
            "position": dict(self.position),
            "metrics": asdict(self.progress),
            "saved_traces": [[trace.cpu() for trace in traces] for traces in self.saved_traces],
        })

    def write_metrics(self) -> dict:
        timings = dict(self.progress.timings)
        timings["samples_per_s"] = timings["samples"] / max(timings["train_s"], 1e-9)
        title = (f"{self.config.benchmark} · {self.config.method}"
                 f"{' + DHP' if self.config.dhp else ''}")
        extra = {}
        heads = dhp_heads(self.model)
        if heads:  # how much plasticity the trained model uses
            extra["plasticity"] = heads[0].plasticity_summary()
        if self.progress.val_acc_matrix:  # for tuning strengths (never tune on test)
            extra.update(val_acc_matrix=self.progress.val_acc_matrix,
                         val_avg_acc=average_accuracies(self.progress.val_acc_matrix))
        if self.progress.trace_diagnostics:  # what the trace does to the accuracies
            extra.update(acc_matrix_trace_zeroed=self.progress.acc_matrix_trace_zeroed,
                         acc_matrix_own_trace=self.progress.acc_matrix_own_trace,
                         trace_diagnostics=self.progress.trace_diagnostics)
        if not self.replicas.is_main:  # rank 0 writes the files
            return run_metrics(self.progress.acc_matrix, self.config_json, timings, extra)
        return write_run_metrics(self.run_dir, self.progress.acc_matrix, self.config_json,
                                 timings, title, extra, log=self.log)

    # ------------------------------------------------------------------ checks and reports

    def _check_finite(self, mean_loss: float, task_id: int, epoch: int) -> None:
        check_finite(self.model, mean_loss, f"task {task_id + 1} epoch {epoch + 1}",
                     self.run_dir / CHECKPOINT_NAME, self.position)

    def _check_stable(self, task_id: int) -> None:
        check_stable(self.regularizer, self.config.lr, self.config.momentum, task_id,
                     self.run_dir / CHECKPOINT_NAME, self.position)

    def log_epoch(self, started: float, epochs_done: int, epochs_left: int) -> None:
        r"""The progress line of the epoch just recorded (``started``: when the loop started)."""
        record = self.progress.epochs[-1]
        task_id, epoch, loss, accuracy = (record[key] for key in ("task", "epoch", "loss",
                                                                  "train_acc"))
        elapsed = time.perf_counter() - started
        eta = elapsed / epochs_done * (epochs_left - epochs_done)
        line = (f"task {task_id + 1}/{len(self.benchmark.tasks)} epoch {epoch + 1}/"
                f"{self.config.epochs}  loss {loss:.4f}  train acc {100 * accuracy:.2f}%  "
                f"elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}")
        if epoch == self.config.epochs - 1:
            line += f"  | avg test acc {100 * average_accuracies(self.progress.acc_matrix)[-1]:.2f}%"
        self.log(line)


def start_or_resume(run_dir, benchmark_of: Callable[[TrainConfig], Benchmark],
                    config: Optional[TrainConfig] = None, device="cpu",
                    **hooks) -> tuple[TrainingRun, str]:
    r"""The run of ``run_dir``, ready to :meth:`~TrainingRun.run`: resumed from its checkpoint if
    it has one, else started from ``config``; returns ``(run, "resumed" | "started")``.

    ``benchmark_of(config)`` builds the data (called once, with the saved configuration when
    resuming). The one way ``dhp-train`` and the reproduction grid open a run. Raises
    :class:`TrainingError` (one line) when there is nothing to resume and no ``config``, or the
    checkpoint cannot be read (e.g. a newer release's: it is never started over) or does not fit.
    """
    if config is not None and not (Path(run_dir) / CHECKPOINT_NAME).exists():
        return TrainingRun.start(config, benchmark_of(config), run_dir, device, **hooks), "started"
    try:
        payload = load_checkpoint(run_dir, map_location=device)
    except CheckpointError as err:
        raise TrainingError(f"cannot resume: {err}") from None
    try:
        saved = TrainConfig.from_json(payload["config"])
    except (KeyError, TypeError) as err:
        raise TrainingError(f"cannot resume: {run_dir} holds no dhp-train checkpoint "
                            f"(missing {err})") from None
    benchmark = benchmark_of(saved)
    try:
        run = TrainingRun.resume(payload, benchmark, run_dir, device, **hooks)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TrainingError(f"cannot resume: the checkpoint in {run_dir} does not fit its "
                            f"configuration ({str(err).splitlines()[0][:200]})") from None
    return run, "resumed"


def _own_storage(state: dict) -> dict:
    # The tensors of a run trained in a cohort (dhp_deploy.cohort) are views of the cohort's
    # stacked tensors, and torch.save writes a view's whole storage: every run's weights.
    return {name: tensor.clone() if (tensor.untyped_storage().nbytes()
                                     != tensor.numel() * tensor.element_size()) else tensor
            for name, tensor in state.items()}


def _benchmark_summary(benchmark: Benchmark) -> dict:
    return {"name": benchmark.name, "num_classes": benchmark.num_classes,
            "input_size": benchmark.input_size, "scenario": benchmark.scenario,
            "tasks": [{"task_id": t.task_id, "classes": list(t.classes)} for t in benchmark.tasks]}


def _rng_state(device: torch.device) -> dict:
    # Batch order and Fisher subsets come from derived generators (the position is their state);
    # the global generators are saved too, so anything else drawing from them resumes exactly.
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
