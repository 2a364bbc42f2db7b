r"""The files of a bundle's formats: TorchScript, ONNX (the dynamo exporter) and AOTInductor's
.pt2, each written from an eval-mode module of a bundle kind (:mod:`dhp_deploy.bundle_kinds`:
frozen, or the plastic model with the trace as an input and an output).

``WRITERS`` is the one table of them the exporter reads: a format's writer takes the served
module, the artifact's path, the bundle kind (example inputs, input and output names, dynamic
axes) and the device to compile for, and returns what the manifest records of it under the
format's name (None: nothing). A new format is its file name in ``bundle.ARTIFACT_FILES``, a
writer here and a loader in ``runtime.LOADERS``."""

import copy
import logging
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from dhp_deploy.bundle import ExportError
from dhp_deploy.bundle_kinds import FROZEN, BundleKind

__all__ = ["ONNX_OPSET", "WRITERS", "write_torchscript", "write_onnx", "write_pt2"]

ONNX_OPSET = 20


def write_torchscript(module: nn.Module, path) -> None:
    scripted = torch.jit.script(module.eval())
    scripted.save(str(path))


@contextmanager
def _quiet_onnx_logs():
    # The dynamo exporter logs a warning per missing optional library (e.g. torchvision ops);
    # the CLI user needs none of it.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_onnx(module: nn.Module, path, kind: BundleKind = FROZEN) -> int:
    r"""ONNX through the dynamo exporter (never the legacy one), dynamic batch, one file.

    Returns the file's ONNX IR version (readers such as onnxruntime support a maximum).
    """
    example, dynamic = kind.example(module, "cpu")
    return _export_onnx(module, path, example, list(kind.input_names), list(kind.output_names),
                        dynamic)


def write_pt2(module: nn.Module, path, kind: BundleKind = FROZEN, device: str = "cpu") -> None:
    r"""``torch.export`` + AOTInductor: a package of code compiled for this host's CPU (or, with
    ``device="cuda"``, its GPU), loaded by ``torch._inductor.aoti_load_package`` in Python and
    ``AOTIModelPackageLoader`` in C++. It needs a C++ compiler here, and runs only on that kind of
    device and with the torch version that compiled it."""
    module = copy.deepcopy(module).to(device)  # the other formats keep the CPU module
    example, dynamic = kind.example(module, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        try:
            program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as err:  # inductor raises many types, e.g. for a missing compiler
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ExportError(f"--format pt2 failed to compile ({first[:200]}); it needs a "
                              f"working C++ compiler") from None


def _export_onnx(module: nn.Module, path, example: tuple, input_names, output_names,
                 dynamic_shapes) -> int:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError as err:
        raise ExportError(f"--format onnx needs onnx and onnxscript ({err}): "
                          f"pip install 'dhp-deploy[onnx]'") from None
    with _quiet_onnx_logs(), warnings.catch_warnings():
        # torch.export's own pytree code trips its LeafSpec deprecation; nothing for us to fix.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        # Inputs sharing one batch dimension (the plastic model's input and labels): expected.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(module.eval(), example, None, dynamo=True,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=ONNX_OPSET,
                                    external_data=False, verbose=False)
    program.save(str(path), external_data=False)
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    return int(written.ir_version)


def _torchscript_artifact(module: nn.Module, path, kind: BundleKind, device: str) -> None:
    write_torchscript(module, path)
    return None


def _onnx_artifact(module: nn.Module, path, kind: BundleKind, device: str) -> dict:
    ir_version = write_onnx(module, path, kind)
    return {"opset": ONNX_OPSET, "exporter": "torch.onnx.export(dynamo=True)",
            "dynamic_axes": kind.onnx_axes, "ir_version": ir_version}


def _pt2_artifact(module: nn.Module, path, kind: BundleKind, device: str) -> dict:
    write_pt2(module, path, kind, device)
    return {"exporter": "torch.export + torch._inductor.aoti_compile_and_package",
            "device": device, "torch": torch.__version__,
            "note": "AOTInductor code compiled for one kind of device: it loads only there "
                    "and with the same torch version"}


# The writer of each format of bundle.FORMATS, in that order.
WRITERS = {"torchscript": _torchscript_artifact, "onnx": _onnx_artifact, "pt2": _pt2_artifact}
