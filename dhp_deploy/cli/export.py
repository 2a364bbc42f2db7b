r"""``dhp-export RUN_DIR --format torchscript|onnx|all [--plastic] --out BUNDLE_DIR``: write a
frozen bundle, or with ``--plastic`` one whose trace keeps learning."""

from pathlib import Path

import click

from dhp_deploy.bundle import FORMATS

FORMAT_CHOICES = (*FORMATS, "all", "triton")


class ExportFailed(click.ClickException):
    r"""A one-line ``Error: ...`` and exit status 1, no traceback."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="all",
              show_default=True, help="Artifacts to write: TorchScript model.ts, ONNX model.onnx, AOTInductor model.pt2, "
                                      "or all three; triton: a Triton model repository with the "
                                      "frozen and the plastic model.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Bundle directory to create (default: export/bundles/<RUN_DIR name>; with "
                   "--format triton, the repository: export/triton/<RUN_DIR name>).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier export at --out (atomically; never a run or a folder "
                   "of other files).")
@click.option("--golden", "golden_count", type=click.IntRange(min=1), default=64,
              show_default=True, help="Number of real test images stored as golden vectors.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="DHP_DATA_DIR", show_envvar=True,
              help="MNIST root (torchvision layout) to rebuild the run's test sets.")
@click.option("--allow-unfinished", is_flag=True,
              help="Export the latest checkpoint of a run whose training has not finished.")
@click.option("--no-verify", is_flag=True,
              help="Skip the check of every artifact against the goldens before committing.")
@click.option("--plastic", is_flag=True,
              help="Export the plastic model instead: the trace is an input and an output "
                   "(labels -1 = predict only), hebb.npy the initial state; it keeps learning.")
@click.option("--pt2-device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="The device the .pt2 package is compiled for (it runs only "
              "there); cuda needs a CUDA GPU on this host. Only with --format pt2 or all.")
@click.option("--triton-cpu", is_flag=True,
              help="--format triton only: instance_group KIND_CPU instead of KIND_GPU.")
@click.option("--triton-sequences", type=click.IntRange(min=1), default=1, show_default=True,
              help="--format triton only: sequences the plastic models serve at once (one model "
                   "instance each; each live sequence also holds one H x C float32 trace).")
@click.pass_context
def main(ctx, run_dir, fmt, out_dir, overwrite, golden_count, data_dir, allow_unfinished,
         no_verify, plastic, pt2_device, triton_cpu, triton_sequences):
    r"""Fold the trained model of RUN_DIR and write a self-checking bundle.

    The DHP head's latest trace is folded into one matrix (θ + α⊙Hebb), so the bundle is a
    plain MLP. The bundle is built beside --out and renamed into place only when complete and
    verified: a failed export leaves nothing at --out.
    """
    _refuse_ignored_options(ctx, fmt, plastic)
    if out_dir is not None:
        _check_out_parent(out_dir)
    from dhp_deploy.export import ExportError, export_run
    from dhp_deploy.sessions import verify_bundle

    if fmt == "triton":
        return _triton(run_dir, out_dir, overwrite, golden_count, data_dir, allow_unfinished,
                       no_verify, triton_cpu, triton_sequences)
    formats = FORMATS if fmt == "all" else (fmt,)
    if pt2_device == "cuda" and "pt2" in formats:
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("cuda: torch sees no CUDA device on this host",
                                     param_hint="--pt2-device")
    verify = None if no_verify else verify_bundle
    out_dir = out_dir or Path("export") / "bundles" / run_dir.resolve().name
    try:
        path = export_run(run_dir, out_dir, formats, overwrite=overwrite,
                          golden_count=golden_count, data_dir=data_dir,
                          allow_unfinished=allow_unfinished, plastic=plastic, verify=verify,
                          pt2_device=pt2_device)
    except ExportError as err:
        raise ExportFailed(str(err)) from None
    kind = "plastic bundle" if plastic else "bundle"
    click.echo(f"wrote {kind} {path} ({', '.join(formats)}; "
               f"{'verified against' if not no_verify else 'with'} {golden_count} goldens)")


def _refuse_ignored_options(ctx, fmt: str, plastic: bool) -> None:
    r"""A usage error for an option the chosen --format would otherwise ignore without a word."""
    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT

    if fmt == "triton" and plastic:
        raise click.UsageError("--plastic does not apply to --format triton: the repository "
                               "always holds both the frozen and the plastic model")
    if given("pt2_device") and fmt not in ("pt2", "all"):
        raise click.UsageError(f"--pt2-device applies to --format pt2 or all, not {fmt} "
                               f"(which writes no .pt2)")
    for option in ("triton_cpu", "triton_sequences"):
        if given(option) and fmt != "triton":
            raise click.UsageError(f"--{option.replace('_', '-')} applies to --format triton "
                                   f"only, not {fmt}")


def _check_out_parent(out_dir: Path) -> None:
    r"""A usage error unless --out's nearest existing ancestor is a directory (the export would
    fail later with a bare "File exists" or "Not a directory")."""
    from dhp_deploy.io import non_directory_ancestor

    blocker = non_directory_ancestor(out_dir)
    if blocker is not None:
        raise click.BadParameter(f"{blocker} is a file, not a directory", param_hint="--out")


def _triton(run_dir, out_dir, overwrite, golden_count, data_dir, allow_unfinished, no_verify,
            cpu, sequences) -> None:
    from dhp_deploy.export import ExportError
    from dhp_deploy.sessions import verify_bundle
    from dhp_deploy.triton import write_triton_repository

    out_dir = out_dir or Path("export") / "triton" / run_dir.resolve().name
    try:
        path = write_triton_repository(
            run_dir, out_dir, overwrite=overwrite, data_dir=data_dir, golden_count=golden_count,
            allow_unfinished=allow_unfinished, gpu=not cpu, sequences=sequences,
            verify=None if no_verify else verify_bundle)
    except ExportError as err:
        raise ExportFailed(str(err)) from None
    click.echo(f"wrote Triton model repository {path} (dhp: frozen, dhp_plastic: sequence "
               f"batching with the trace as implicit state; ONNX, and TorchScript as "
               f"dhp_torchscript, dhp_plastic_torchscript; {'KIND_CPU' if cpu else 'KIND_GPU'}; "
               f"{sequences} concurrent sequence(s); requirements in its README.md)")


if __name__ == "__main__":  # pragma: no cover
    main()
