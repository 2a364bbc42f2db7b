r"""``dhp-serve check|predict|bench BUNDLE``: run a bundle with the Python runtimes."""

from pathlib import Path

import click

from dhp_deploy.bundle import DEVICES, FORMATS

BACKEND_CHOICES = (*FORMATS, "all")


class ServeFailed(click.ClickException):
    r"""A one-line ``Error: ...`` and exit status 1, no traceback."""


bundle_argument = click.argument("bundle", type=click.Path(exists=True, file_okay=False,
                                                           path_type=Path))
device_option = click.option("--device", type=click.Choice(DEVICES), default="cpu",
                             show_default=True, help="Where to run (cuda fails if unavailable).")


def _backends(bundle: Path, backend: str) -> list[str]:
    from dhp_deploy.runtime import BundleError, read_manifest

    if backend != "all":
        return [backend]
    try:
        return list(read_manifest(bundle, verify=False).get("artifacts") or {})
    except BundleError as err:
        raise ServeFailed(str(err)) from None


def _open(bundle: Path, backend: str, device: str, threads: int | None = 1):
    from dhp_deploy.runtime import BundleError, open_bundle

    try:
        return open_bundle(bundle, backend=backend, device=device, threads=threads)
    except BundleError as err:
        raise ServeFailed(str(err)) from None


def _read_npy(path: Path):
    r"""The array in ``path``; ServeFailed unless it is a .npy array file (numpy would try any
    other file as a pickle, and blame "pickled (object) data" on a text or image file)."""
    import numpy as np

    try:
        with open(path, "rb") as file:
            magic = file.read(6)
    except OSError as err:
        raise ServeFailed(f"cannot read {path}: {err.strerror or err}") from None
    if magic != b"\x93NUMPY":
        raise ServeFailed(f"{path} is not a .npy array file (no NumPy header; save the array "
                          f"with numpy.save)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ServeFailed(f"{path} is not a readable .npy array "
                          f"({str(err).splitlines()[0][:200]})") from None


def _check_output_parent(path: Path) -> None:
    r"""A usage error unless ``path``'s nearest existing ancestor is a directory (a file there
    makes the write fail with a bare "Not a directory" or "File exists")."""
    from dhp_deploy.io import non_directory_ancestor

    blocker = non_directory_ancestor(path)
    if blocker is not None:
        raise click.BadParameter(f"{blocker} is a file, not a directory",
                                 param_hint="--output")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    r"""Check, run and time dhp-export bundles (TorchScript / ONNX Runtime, CPU / CUDA)."""


@main.command()
@bundle_argument
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="all", show_default=True,
              help="Runtime to check; all = every artifact in the bundle.")
@device_option
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Absolute tolerance (default: the manifest's, 1e-5 for fp32).")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative tolerance (default: the manifest's, 1e-4 for fp32).")
def check(bundle, backend, device, atol, rtol):
    r"""Run the golden inputs (one batch, then one row at a time) against the eager logits.

    Passes when |out − golden| ≤ atol + rtol·|golden| everywhere and every argmax (all classes
    and within each row's task head) agrees; exit status 1 otherwise. A plastic bundle replays its
    golden stream of calls instead (every call's logits and trace). A Triton repository
    (dhp-export --format triton) is checked instead: files, sha256, every config against its model.
    """
    from dhp_deploy.bundle import ATOL, RTOL, BundleError, bundle_kind, read_manifest
    from dhp_deploy.sessions import open_session

    if not (bundle / "manifest.json").exists():  # not a bundle; maybe a Triton repository
        from dhp_deploy.triton_repository import is_repository

        if is_repository(bundle):
            return _check_triton(bundle)
    try:
        kind = bundle_kind(read_manifest(bundle, verify=False))
    except BundleError as err:
        raise ServeFailed(str(err)) from None
    label = " (plastic)" if kind == "plastic" else ""

    def check_one(name: str) -> tuple[bool, str]:
        try:
            session = open_session(bundle, backend=name, device=device)
            tolerance = session.manifest.get("golden", {}).get("tolerance", {})
            a = atol if atol is not None else float(tolerance.get("atol", ATOL))
            r = rtol if rtol is not None else float(tolerance.get("rtol", RTOL))
            report = session.check(atol=a, rtol=r)
        except BundleError as err:
            raise ServeFailed(str(err)) from None
        except Exception as err:  # a backend failing at run time (e.g. CUDA OOM)
            raise ServeFailed(f"{name}/{device}: {str(err).splitlines()[0][:300]}") from None
        return report["ok"], (f"{name}/{device}{label}: {session.describe(report)} "
                              f"atol={a:g} rtol={r:g}")

    what = "plastic parity check" if kind == "plastic" else "parity check"
    _report_each(_backends(bundle, backend), check_one, what)


def _check_triton(repo: Path) -> None:
    from dhp_deploy.bundle import ExportError
    from dhp_deploy.triton_repository import check_repository

    try:
        click.echo("\n".join(check_repository(repo)))
    except ExportError as err:
        raise ServeFailed(" ".join(str(err).split())) from None


def _report_each(backends: list, check_one, what: str) -> None:
    r"""``check_one(name) → (ok, line)`` for every backend, one line each with its verdict; a
    ServeFailed naming the backends that failed, after all of them ran."""
    failed = []
    for name in backends:
        ok, line = check_one(name)
        click.echo(f"{line} {'OK' if ok else 'FAIL'}")
        if not ok:
            failed.append(name)
    if failed:
        raise ServeFailed(f"{what} failed for {', '.join(failed)}")


@main.command()
@bundle_argument
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="float32 .npy of shape [N, 784], pixels in [0, 1].")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the results, atomically: FILE.npy holds the logits only, "
                   "any other name an .npz of logits, classes and labels.")
@click.option("--task", type=int, default=None,
              help="Task head: logits of the task's classes only, argmax within them. Required "
                   "for a task-incremental (multi-head) bundle unless --all-classes.")
@click.option("--all-classes", is_flag=True,
              help="Logits of all classes, argmax over all of them, even for a task-incremental "
                   "bundle (whose heads were never trained to compete).")
@click.option("--backend", type=click.Choice(FORMATS), default="torchscript",
              show_default=True, help="Runtime to use.")
@device_option
@click.option("--allow-nonfinite", is_flag=True,
              help="Run rows with NaN/inf pixels instead of rejecting the input.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads of the runtime (1: steady latency on a shared host).")
def predict(bundle, input_path, output_path, task, all_classes, backend, device,
            allow_nonfinite, threads):
    r"""Predict the classes of the images in --input; write logits, classes and labels.

    The .npz holds ``logits`` float32 [N, K] (K = all classes, or the task's classes with --task),
    ``classes`` int64 [K] (the global class id of each column) and ``labels`` int64 [N] (the
    predicted global class ids). An --output ending in .npy gets the logits array alone.
    A task-incremental bundle needs --task T (or --all-classes): its argmax over all classes
    compares heads that were never trained against each other.
    """
    import numpy as np

    from dhp_deploy.io import atomic_writer  # not run_dir's re-export: that one loads torch
    from dhp_deploy.runtime import BundleError

    if task is not None and all_classes:
        raise click.UsageError("--task and --all-classes exclude each other")
    _check_output_parent(output_path)
    x = _read_npy(input_path)
    runtime = _open(bundle, backend, device, threads)
    if task is None and not all_classes and runtime.manifest.get("scenario") == "task":
        raise click.UsageError(
            f"{bundle} is task-incremental (multi-head): pass --task T (one of "
            f"{', '.join(map(str, runtime.tasks))}) to predict within a task's classes, or "
            f"--all-classes to predict over all {runtime.num_classes} classes")
    try:
        out = runtime.predict(x, task=task, allow_nonfinite=allow_nonfinite)
    except BundleError as err:
        raise ServeFailed(f"{input_path}: {err}") from None
    try:
        with atomic_writer(output_path) as file:
            if output_path.suffix == ".npy":
                np.save(file, out.logits, allow_pickle=False)
            else:
                np.savez(file, logits=out.logits, classes=out.classes, labels=out.labels)
    except OSError as err:
        raise ServeFailed(f"cannot write {output_path}: {err.strerror or err}") from None
    click.echo(f"wrote {output_path}: {len(out.labels)} predictions "
               f"({'task ' + str(task) if task is not None else 'all classes'})")


@main.command()
@bundle_argument
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="all", show_default=True,
              help="Runtime to time; all = every artifact in the bundle.")
@device_option
@click.option("--iters", type=click.IntRange(min=10), default=300, show_default=True,
              help="Timed batch-1 calls (p50/p99 latency).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Batch size of the throughput run.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed large-batch calls (the median gives the throughput).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads of the runtime (more can raise the large-batch throughput "
                   "and, on a shared host, the batch-1 p99 latency).")
def bench(bundle, backend, device, iters, batch_size, repeats, threads):
    r"""Batch-1 latency (p50/p99) and large-batch throughput of each backend.

    Times the backend call alone (no input checks) on the golden images, tiled to the batch size.
    GFLOP/s counts 2·Σ(in·out) multiply-adds per sample (the manifest's flops_per_sample).
    """
    import numpy as np

    from dhp_deploy.runtime import time_calls

    for name in _backends(bundle, backend):
        runtime = _open(bundle, name, device, threads)
        inputs = runtime.golden()["inputs"]
        one = np.ascontiguousarray(inputs[:1])
        try:
            big = np.ascontiguousarray(np.resize(inputs, (batch_size, inputs.shape[1])))
            latency = time_calls(runtime.run_unchecked, one, iters, warmup=20) * 1e3
            seconds = float(np.median(time_calls(runtime.run_unchecked, big, repeats, warmup=3)))
        except MemoryError:
            raise ServeFailed(f"--batch-size {batch_size}: its input alone needs "
                              f"{batch_size * inputs[:1].nbytes / 2 ** 30:.3g} GiB, more than "
                              f"this host could allocate") from None
        except Exception as err:  # a backend failing at run time (e.g. out of memory)
            raise ServeFailed(f"{name}/{device}: {str(err).splitlines()[0][:300]}") from None
        per_second = batch_size / seconds
        gflops = per_second * runtime.manifest["model"]["flops_per_sample"] / 1e9
        click.echo(f"{name}/{device}: batch 1 p50={np.percentile(latency, 50):.3f} ms "
                   f"p99={np.percentile(latency, 99):.3f} ms; batch {batch_size} "
                   f"{per_second:,.0f} samples/s = {gflops:.1f} GFLOP/s ({threads} thread"
                   f"{'s' if threads > 1 else ''})")


if __name__ == "__main__":  # pragma: no cover
    main()
