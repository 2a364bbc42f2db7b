r"""``dhp-train``: continual training on a benchmark, with checkpoints and exact resume.

Examples::

    dhp-train --benchmark split-mnist --method finetune --out runs/split-dhp
    dhp-train --benchmark permuted-mnist --method ewc --no-dhp --num-tasks 3 --out runs/pm-ewc
    dhp-train --resume runs/pm-ewc          # continue an interrupted run, bit for bit
    torchrun --nproc-per-node 2 -m dhp_deploy.cli.train --benchmark split-mnist --out runs/ddp

Under ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) the run
is data-parallel: gloo on CPU, NCCL on CUDA, ``--batch-size`` the global batch, the Hebbian trace
synchronised (``dhp_deploy.distributed``); rank 0 writes the run directory.

A run directory holds ``config.json``, ``checkpoint.pt`` (after every epoch) and, when finished,
``metrics.json``, ``metrics.csv`` and ``accuracy.png``.
"""

import os
import signal
from pathlib import Path

import click

from dhp_deploy.distributed import DEFAULT_TIMEOUT_S
from dhp_deploy.tasks import SPECS
from dhp_deploy.layer import WEIGHT_INITS
from dhp_deploy.regularizers import OPTIONS, REGISTRY, STRENGTH_OPTION
from dhp_deploy.config import TrainConfig

# Options that decide the result: with --resume they come from the checkpoint, never the command.
TRAINING_OPTIONS = ("benchmark", "method", "dhp", "epochs", "batch_size", "lr", "momentum", "seed",
                    "permutation_seed", "hidden", "head_init", "eta_bound", "trace_reset", *OPTIONS,
                    "val_fraction", "class_incremental", "num_tasks", "train_limit", "test_limit")
SEARCHED = "the value searched for the benchmark (README)"
DEFAULT = TrainConfig  # every training option's default is TrainConfig's (one place)


class Registered(click.Choice):
    r"""A choice among the registered methods at the time of the call (a method registered after
    this module was imported is offered too)."""

    def __init__(self, registry: dict) -> None:
        self.registry = registry
        super().__init__(tuple(registry))

    @property
    def choices(self):
        return tuple(self.registry)

    @choices.setter
    def choices(self, _) -> None:
        pass


def regularizer_options(command):
    r"""One option per registered regulariser option, as its class declares it: a strength
    defaults to the value searched for the benchmark, the others to their declared default."""
    for name, option in reversed(OPTIONS.items()):  # decorators apply bottom-up
        kind = click.IntRange if option.integer else click.FloatRange
        limits = {"min": option.low, "max": option.high}
        if not option.integer:
            limits["min_open"] = option.low_open
        strength = name in STRENGTH_OPTION.values()
        command = click.option(f"--{name.replace('_', '-')}", type=kind(**limits),
                               default=None if strength else option.default,
                               show_default=SEARCHED if strength else True,
                               help=option.help)(command)
    return command


# Test hook: "sigkill-after-steps=N" makes the process SIGKILL itself after N optimiser steps.
FAULT_ENV = "DHP_TRAIN_FAULT"


class TrainCommandError(click.ClickException):
    r"""A run that cannot start or go on (data, checkpoint, divergence): one line, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the source said


class HiddenSizes(click.ParamType):
    r"""Comma-separated positive layer widths, e.g. ``256,256``."""

    name = "WIDTHS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            widths = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not widths or min(widths) < 1:
            self.fail(f"{value!r}: every width must be a positive integer", param, ctx)
        return widths


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--benchmark", type=Registered(SPECS), help="Task sequence to train on "
              "(required unless --resume).")
@click.option("--method", type=Registered(REGISTRY), default=DEFAULT.method, show_default=True,
              help="Consolidation regulariser on the slow weights.")
@click.option("--dhp/--no-dhp", default=DEFAULT.dhp, show_default=True,
              help="DHP-Softmax output layer, or a plain linear head.")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULT.epochs, show_default=True,
              help="Epochs per task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT.batch_size,
              show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT.lr,
              show_default=True, help="SGD learning rate.")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT.momentum,
              show_default=True, help="SGD momentum.")
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULT.seed, show_default=True,
              help="Seeds weights, batch order, Fisher subsets and the benchmark.")
@click.option("--permutation-seed", type=click.IntRange(min=0),
              show_default="the run's --seed",
              help="Permuted benchmarks: seed of the pixel orders alone, so that runs of several "
                   "seeds share one sequence of tasks.")
@click.option("--hidden", type=HiddenSizes(), default=",".join(map(str, DEFAULT.hidden)),
              show_default=True,
              help="Hidden layer widths.")
@click.option("--head-init", type=click.Choice(WEIGHT_INITS), show_default="authors with --dhp, "
              "linear with --no-dhp (the paper's setup)",
              help="Output layer θ init: the DHP authors' code (bound 1/√classes) or nn.Linear's "
                   "(bound 1/√inputs).")
@click.option("--eta-bound/--no-eta-bound", default=DEFAULT.eta_bound, show_default=True,
              help="Keep the DHP plasticity rate η in [0, 1] (clamped after every update; ours, "
                   "not the paper's: Algorithm 1 leaves η free, and outside [0, 1] the trace "
                   "can grow until NaN).")
@click.option("--trace-reset/--no-trace-reset", default=DEFAULT.trace_reset, show_default=True,
              help="Zero the DHP trace at the start of every task after the first (ours, an "
                   "intervention of the trace study; the paper never resets it).")
@regularizer_options
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
              default=DEFAULT.val_fraction,
              show_default=True, help="Share of each task's training set held out for tuning.")
@click.option("--class-incremental", is_flag=True,
              help="Split benchmarks: one head over all classes instead of one per task.")
@click.option("--num-tasks", type=click.IntRange(min=1), help="Train on the first tasks only.")
@click.option("--train-limit", type=click.IntRange(min=1),
              help="At most this many training examples per task (quick runs).")
@click.option("--test-limit", type=click.IntRange(min=1),
              help="At most this many test examples per task (quick runs).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="DHP_DATA_DIR", default="data", show_default="$DHP_DATA_DIR, else ./data",
              help="Root holding MNIST/raw/ (torchvision layout).")
@click.option("--download", is_flag=True, help="Fetch missing dataset files.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto",
              show_default=True, help="auto: CUDA when available.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="On CUDA, replay each task's training step as one CUDA graph (plain SGD).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to create (required unless --resume).")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False,
              path_type=Path), help="Continue the run in this directory where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace the run files of a non-empty --out.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch (default: torch's choice). On a busy machine 1 can be "
                   "several times faster than 2. Resume with the same count for identical bits.")
@click.option("--quiet", is_flag=True, help="No progress lines and no summary.")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Under torchrun: seconds a rank waits for the others in a "
              "collective before it fails (a dead rank never hangs the run).")
@click.pass_context
def main(ctx, out_dir, resume_dir, overwrite, data_dir, download, device, cuda_graphs, threads,
         quiet, dist_timeout, **training):
    r"""Train a DHP network on a continual-learning benchmark, one task after another."""
    if (out_dir is None) == (resume_dir is None):
        raise click.UsageError("give exactly one of --out RUN_DIR (a new run) and --resume RUN_DIR")
    if resume_dir is not None:
        _refuse_training_options_on_resume(ctx)
    elif training["benchmark"] is None:
        raise click.UsageError("missing option --benchmark (required unless --resume)")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    replicas, device = _join_replicas(_resolve_device(device), dist_timeout)
    quiet = quiet or not replicas.is_main  # rank 0 speaks for the run
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    options = {"data_dir": data_dir, "download": download, "device": device, "log": log,
               "cuda_graphs": cuda_graphs, "replicas": replicas}
    try:
        if resume_dir is not None:
            run, run_dir = _resume_run(resume_dir, **options), resume_dir
        else:
            _on_main_then_shared(replicas, device, lambda: _prepare_run_dir(out_dir, overwrite))
            run, run_dir = _start_run(training, out_dir, **options), out_dir
        metrics = _run_to_the_end(run)
        replicas.barrier()  # leave together: a rank that exits early can abort a peer's teardown
    except MemoryError as err:
        raise _out_of_memory(err) from None
    except RuntimeError as err:  # a collective failed: another rank died or stopped answering
        if "allocate" in str(err) or "out of memory" in str(err):  # torch's CPU / CUDA allocators
            raise _out_of_memory(err) from None
        if not replicas.distributed:
            raise
        detail = str(err).splitlines()[0].rsplit("] ", 1)[-1]  # gloo prefixes a source path
        raise TrainCommandError(
            f"rank {replicas.rank} of {replicas.world_size}: lost the other ranks "
            f"({detail[:160]}); {_where_to_continue(resume_dir or out_dir)}") from None
    finally:
        _leave_replicas(replicas)
    if not quiet:
        click.echo(summary_table(metrics, run_dir))


def _out_of_memory(err: BaseException) -> TrainCommandError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return TrainCommandError(f"out of memory ({first[:200]}): a smaller --hidden or "
                             f"--batch-size fits")


def _where_to_continue(run_dir: Path) -> str:
    r"""What a user can do after a lost rank: resume from the checkpoint, if there is one yet."""
    from dhp_deploy.run_dir import CHECKPOINT_NAME

    if (run_dir / CHECKPOINT_NAME).exists():
        return f"the last checkpoint in {run_dir} is intact: continue with torchrun ... --resume"
    return f"no checkpoint was written to {run_dir} yet: start the run again"


def _join_replicas(device: str, timeout_s: float):
    r"""``(replicas, device)``: this process's place in a torchrun group (or the only process)."""
    from dhp_deploy.distributed import DistributedError, from_environment

    try:
        return from_environment(device, timeout_s)
    except DistributedError as err:
        raise TrainCommandError(str(err)) from None


def _leave_replicas(replicas) -> None:
    from dhp_deploy.distributed import shutdown

    shutdown(replicas)


def _on_main_then_shared(replicas, device: str, action) -> None:
    r"""``action()`` on rank 0 alone; its failure stops every rank (the others with one line)."""
    import torch

    failed = torch.zeros(1, device=device)  # on the GPU for NCCL
    try:
        if replicas.is_main:
            action()
    except click.ClickException:
        failed += 1
        replicas.all_reduce(failed)
        raise
    if replicas.all_reduce(failed).item():
        raise TrainCommandError(f"rank {replicas.rank}: rank 0 refused the run directory (its "
                                f"error says why)")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA was asked for but torch sees no CUDA device",
                                     param_hint="--device")
        # Deterministic cuBLAS and kernels, so a resumed run matches an uninterrupted one.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def _refuse_training_options_on_resume(ctx: click.Context) -> None:
    given = [f"--{name.replace('_', '-')}" for name in TRAINING_OPTIONS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"--resume continues with the saved configuration; drop "
                               f"{', '.join(given)}")


def _prepare_run_dir(out_dir: Path, overwrite: bool) -> None:
    r"""Create ``out_dir`` and prove it writable; refuse a non-empty one unless ``overwrite``."""
    from dhp_deploy.run_dir import RUN_FILES, atomic_write_text

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".dhp-train-write-test"
        atomic_write_text(probe, "")
        probe.unlink()
    except OSError as err:
        raise TrainCommandError(f"cannot write to the output directory {out_dir}: "
                                f"{err.strerror or err}") from None
    if any(out_dir.iterdir()):
        if not overwrite:
            raise click.BadParameter(f"{out_dir} is not empty ({_describe_run_dir(out_dir)}); "
                                     f"pass --overwrite to replace its run files",
                                     param_hint="--out")
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)


def _describe_run_dir(run_dir: Path) -> str:
    from dhp_deploy.run_dir import CheckpointError, load_checkpoint

    try:
        payload = load_checkpoint(run_dir)
    except CheckpointError:
        return "no resumable run in it"
    if payload.get("position", {}).get("finished"):
        return "it holds a finished run"
    return f"it holds an unfinished run: continue it with --resume {run_dir}"


def _benchmark_builder(data_dir, download: bool, device: str):
    r"""``config → Benchmark`` for :func:`dhp_deploy.train.start_or_resume`; data errors → one line."""
    def build(config):
        from dhp_deploy.tasks import build_benchmark
        from dhp_deploy.data import DataError

        arguments = {**config.data_arguments(), "download": download or config.download}
        try:
            return build_benchmark(**arguments, data_dir=data_dir, device=device)
        except DataError as err:
            raise TrainCommandError(str(err)) from None

    return build


def _start_run(training: dict, out_dir: Path, data_dir, download: bool, device: str, log,
               cuda_graphs: bool, replicas):
    from dhp_deploy.train import TrainingError, start_or_resume

    config = TrainConfig(**training, download=download)
    try:  # the directory holds no run files (checked by _prepare_run_dir): this starts
        run, _ = start_or_resume(out_dir, _benchmark_builder(data_dir, download, device), config,
                                 device, log=log, on_step=_fault_hook(),
                                 cuda_graphs=cuda_graphs, replicas=replicas)
    except TrainingError as err:
        raise TrainCommandError(str(err)) from None
    where = device if not replicas.distributed else \
        f"{replicas.world_size} {replicas.backend} ranks ({device} on rank 0)"
    log(f"training {config.method}{' + DHP' if config.dhp else ''} on {run.benchmark.name} "
        f"({len(run.benchmark.tasks)} tasks, scenario {run.benchmark.scenario}) on {where}; "
        f"run directory {out_dir}")
    return run


def _resume_run(run_dir: Path, data_dir, download: bool, device: str, log, cuda_graphs: bool,
                replicas):
    from dhp_deploy.train import TrainingError, start_or_resume

    try:
        run, _ = start_or_resume(run_dir, _benchmark_builder(data_dir, download, device),
                                 device=device, log=log, on_step=_fault_hook(),
                                 cuda_graphs=cuda_graphs, replicas=replicas)
    except TrainingError as err:
        raise TrainCommandError(str(err)) from None
    position = run.position
    log(f"resuming {run_dir} after task {position['task'] + 1} epoch {position['epoch'] + 1}"
        if not position["finished"] else f"{run_dir} is already finished; rewriting its metrics")
    return run


def _run_to_the_end(run) -> dict:
    from dhp_deploy.train import TrainingError

    try:
        return run.run()
    except TrainingError as err:
        raise TrainCommandError(str(err)) from None


def _fault_hook():
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, _, count = spec.partition("=")
    if kind != "sigkill-after-steps" or not count.isdigit():
        raise click.UsageError(f"{FAULT_ENV}={spec!r}: expected sigkill-after-steps=N")
    limit = int(count)

    def sigkill_after(steps: int) -> None:
        if steps >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return sigkill_after


def summary_table(metrics: dict, run_dir: Path) -> str:
    r"""The accuracy matrix (%) with the average accuracy per row, then ACC / BWT / forgetting."""
    matrix = metrics["acc_matrix"]
    num_tasks = len(matrix[0]) if matrix else 0
    header = "after task " + "".join(f"{f'T{j + 1}':>8}" for j in range(num_tasks)) + f"{'avg':>9}"
    lines = [header, "-" * len(header)]
    for i, (row, average) in enumerate(zip(matrix, metrics["avg_acc"])):
        lines.append(f"{i + 1:>10} " + "".join(f"{100 * v:8.2f}" for v in row)
                     + f"{100 * average:9.2f}")

    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines.append(f"ACC {percent(metrics['acc'])}  BWT {percent(metrics['bwt'])}  forgetting "
                 f"{percent(metrics['forgetting'])}  ({metrics['timings']['samples_per_s']:.0f} "
                 f"samples/s)  → {run_dir / 'metrics.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(prog_name="dhp-train")
