r"""A Triton Inference Server model repository of a trained run: the frozen and the plastic model.

``dhp-export RUN --format triton --out REPO`` writes::

    REPO/
      repository.json                what was exported, and the sha256 of every file below
      dhp/                           the frozen (folded) model, stateless
        config.pbtxt                 onnxruntime backend, max_batch_size, dynamic_batching, GPU
        1/model.onnx
      dhp_plastic/                   the plastic model: the trace is Triton-held sequence state
        config.pbtxt                 sequence_batching with an implicit state hebb ↔ hebb_out
        1/model.onnx
        initial_state/hebb           the exported trace, raw float32 row-major (H × C)
      dhp_torchscript/               the same two models as TorchScript for Triton's PyTorch
      dhp_plastic_torchscript/       (LibTorch) backend: 1/model.pt, tensors named <name>__<index>

Every model file is an artifact of a bundle that was verified against its goldens (the frozen
one-shot goldens, the plastic golden stream) before the repository was assembled, and the whole
repository is written beside ``REPO`` and renamed into place, or not at all. Triton's PyTorch
backend addresses a TorchScript model's tensors by position, so there the names follow its
convention ``<name>__<index>`` (``input__0``, ``labels__1``, ``hebb__2``; ``logits__0``,
``hebb_out__1``): forward's argument order for inputs, the returned tuple's for outputs.

The frozen model batches across requests (``max_batch_size``, dims without the batch axis). The
plastic model takes ``max_batch_size: 0``: one request is one call of N rows of one sequence
(each sequence has its own trace, which has no batch axis), and Triton feeds ``hebb_out`` of a
request back as ``hebb`` of the next request of the same sequence, starting from
``initial_state/hebb`` when the sequence starts. ``instance_group`` is ``KIND_GPU``; for a CPU
host use ``gpu=False`` (``--triton-cpu``), which writes ``KIND_CPU``. serve/README.md shows how
to start ``tritonserver`` on the repository and call both models.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dhp_deploy.bundle import (ARTIFACT_FILES, HEBB_FILE, HEBB_NAME, HEBB_OUT_NAME, INPUT_NAME,
                               LABELS_NAME, MANIFEST_NAME, OUTPUT_NAME, sha256_file)
from dhp_deploy.export import ExportError, _commit, export_run

__all__ = ["write_triton_repository", "validate_repository", "frozen_config", "plastic_config",
           "model_name", "FROZEN_MODEL", "PLASTIC_MODEL", "REPOSITORY_FILE", "TRITON_BACKENDS"]

FROZEN_MODEL, PLASTIC_MODEL = "dhp", "dhp_plastic"
# Triton backend → (the bundle artifact it serves, its file name in the model version folder).
TRITON_BACKENDS = {"onnxruntime": ("onnx", "model.onnx"), "pytorch": ("torchscript", "model.pt")}
REPOSITORY_FILE = "repository.json"
INITIAL_STATE_DIR, INITIAL_STATE_FILE = "initial_state", "hebb"
MAX_BATCH_SIZE = 4096  # the frozen model's largest server-side batch
MAX_QUEUE_DELAY_US = 100  # dynamic batching: how long a request may wait for others


def model_name(plastic: bool, backend: str) -> str:
    base = PLASTIC_MODEL if plastic else FROZEN_MODEL
    return base if backend == "onnxruntime" else f"{base}_torchscript"


def _names(backend: str, *names: str) -> list:
    # The PyTorch backend's convention: <name>__<index>, the index being the tensor's position.
    return list(names) if backend == "onnxruntime" else [f"{n}__{i}" for i, n in enumerate(names)]


def frozen_config(in_features: int, num_classes: int, gpu: bool = True,
                  backend: str = "onnxruntime") -> str:
    r"""config.pbtxt of the frozen model (Triton's ModelConfig in protobuf text format)."""
    (x,), (logits,) = _names(backend, INPUT_NAME), _names(backend, OUTPUT_NAME)
    return f"""name: "{model_name(False, backend)}"
backend: "{backend}"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{ name: "{x}" data_type: TYPE_FP32 dims: [ {in_features} ] }}
]
output [
  {{ name: "{logits}" data_type: TYPE_FP32 dims: [ {num_classes} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}
instance_group [ {{ count: 1 kind: {"KIND_GPU" if gpu else "KIND_CPU"} }} ]
"""


def plastic_config(in_features: int, hidden: int, num_classes: int, gpu: bool = True,
                   backend: str = "onnxruntime") -> str:
    r"""config.pbtxt of the plastic model: sequence batching, the trace as implicit state."""
    x, labels, hebb = _names(backend, INPUT_NAME, LABELS_NAME, HEBB_NAME)
    logits, hebb_out = _names(backend, OUTPUT_NAME, HEBB_OUT_NAME)
    return f"""name: "{model_name(True, backend)}"
backend: "{backend}"
max_batch_size: 0
input [
  {{ name: "{x}" data_type: TYPE_FP32 dims: [ -1, {in_features} ] }},
  {{ name: "{labels}" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "{logits}" data_type: TYPE_FP32 dims: [ -1, {num_classes} ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  direct {{ }}
  state [
    {{
      input_name: "{hebb}"
      output_name: "{hebb_out}"
      data_type: TYPE_FP32
      dims: [ {hidden}, {num_classes} ]
      initial_state [
        {{
          name: "exported trace"
          data_type: TYPE_FP32
          dims: [ {hidden}, {num_classes} ]
          data_file: "{INITIAL_STATE_FILE}"
        }}
      ]
    }}
  ]
}}
instance_group [ {{ count: 1 kind: {"KIND_GPU" if gpu else "KIND_CPU"} }} ]
"""


def write_triton_repository(run_dir, out_dir, *, overwrite: bool = False, data_dir=None,
                            golden_count: int = 64, allow_unfinished: bool = False,
                            gpu: bool = True, verify_frozen=None, verify_plastic=None) -> Path:
    r"""Export ``run_dir``'s frozen and plastic ONNX models as a Triton repository at
    ``out_dir``. ``verify_*`` check each bundle before it is used (as in :func:`export_run`).
    Raises :class:`ExportError`; nothing is written at ``out_dir`` then."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (pass overwrite / --overwrite to replace it)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    except OSError as err:
        raise ExportError(f"cannot create the repository beside {out_dir}: "
                          f"{err.strerror or err}") from None
    try:
        bundles = {}
        for name, plastic, verify in ((FROZEN_MODEL, False, verify_frozen),
                                      (PLASTIC_MODEL, True, verify_plastic)):
            bundles[name] = export_run(run_dir, work / f"bundle-{name}", ("onnx", "torchscript"),
                                       golden_count=golden_count, data_dir=data_dir,
                                       allow_unfinished=allow_unfinished, plastic=plastic,
                                       verify=verify)
        repo = work / "repository"
        _assemble(repo, bundles, gpu)
        _fsync_all(repo)
        _commit(repo, out_dir, overwrite)
    except OSError as err:
        raise ExportError(f"writing the repository failed: {err}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _assemble(repo: Path, bundles: dict, gpu: bool) -> None:
    frozen = json.loads((bundles[FROZEN_MODEL] / MANIFEST_NAME).read_text())
    in_features = int(frozen["input"]["shape"][1])
    num_classes = int(frozen["output"]["shape"][1])
    hebb = np.load(bundles[PLASTIC_MODEL] / HEBB_FILE, allow_pickle=False)
    for backend, (artifact, file_name) in TRITON_BACKENDS.items():
        configs = {False: frozen_config(in_features, num_classes, gpu, backend),
                   True: plastic_config(in_features, hebb.shape[0], num_classes, gpu, backend)}
        for plastic, config in configs.items():
            folder = repo / model_name(plastic, backend)
            (folder / "1").mkdir(parents=True)
            bundle = bundles[PLASTIC_MODEL if plastic else FROZEN_MODEL]
            shutil.copyfile(bundle / ARTIFACT_FILES[artifact], folder / "1" / file_name)
            (folder / "config.pbtxt").write_text(config)
        state = repo / model_name(True, backend) / INITIAL_STATE_DIR
        state.mkdir()
        (state / INITIAL_STATE_FILE).write_bytes(np.ascontiguousarray(hebb, np.float32).tobytes())
    files = {str(path.relative_to(repo)): sha256_file(path)
             for path in sorted(repo.rglob("*")) if path.is_file()}
    record = {"format": "dhp-deploy-triton-repository", "version": 1,
              "models": {model_name(plastic, backend): f"{kind}, {backend} backend"
                         for backend in TRITON_BACKENDS
                         for plastic, kind in ((False, "frozen (folded trace), stateless"),
                                               (True, "plastic: sequence batching, implicit "
                                                      "state hebb"))},
              "training": frozen["training"], "metrics": frozen["metrics"],
              "instance_kind": "KIND_GPU" if gpu else "KIND_CPU", "sha256": files}
    (repo / REPOSITORY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _fsync_all(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders holding them
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_repository(repo) -> dict:
    r"""Parse every ``config.pbtxt`` of ``repo`` with Triton's own ModelConfig schema (from
    ``tritonclient``, strict: an unknown field or a wrong type fails) and check it against its
    model: for ONNX, tensor names, element types and shapes from the graph; for TorchScript, the
    ``<name>__<index>`` names against forward's arguments and a call's results; the implicit
    state pair, the initial state file's size, and every file's sha256. Returns ``{model: ModelConfig}``; raises
    :class:`ExportError` with the first problem."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise ExportError(f"validating a Triton repository needs tritonclient[grpc] ({err}): "
                          f"pip install 'dhp-deploy[triton]'") from None
    import onnx

    repo = Path(repo)
    record = json.loads((repo / REPOSITORY_FILE).read_text())
    for name, digest in record["sha256"].items():
        if sha256_file(repo / name) != digest:
            raise ExportError(f"{repo / name} fails its sha256 check")
    configs = {}
    for backend, (_, file_name) in TRITON_BACKENDS.items():
        for name in (model_name(False, backend), model_name(True, backend)):
            try:
                config = text_format.Parse((repo / name / "config.pbtxt").read_text(),
                                           model_config_pb2.ModelConfig())
            except text_format.ParseError as err:
                raise ExportError(f"{repo / name / 'config.pbtxt'}: not a Triton ModelConfig "
                                  f"({err})") from None
            model = repo / name / "1" / file_name
            if backend == "onnxruntime":
                _match(config, onnx.load(str(model)).graph, model_config_pb2, repo / name)
            else:
                _match_torchscript(config, model, model_config_pb2, repo / name)
            configs[name] = config
    return configs


_ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64"}  # onnx TensorProto → Triton DataType


def _match(config, graph, pb2, where: Path) -> None:
    onnx_inputs = {v.name: v for v in graph.input}
    onnx_outputs = {v.name: v for v in graph.output}
    batch = [-1] if config.max_batch_size > 0 else []  # Triton leaves the batch axis out

    def check(tensor_name, data_type, dims, table, role):
        value = table.get(tensor_name)
        if value is None:
            raise ExportError(f"{where}: {role} {tensor_name!r} is not in the ONNX model "
                              f"(it has {sorted(table)})")
        kind = _ONNX_TO_TRITON.get(value.type.tensor_type.elem_type)
        if kind != pb2.DataType.Name(data_type):
            raise ExportError(f"{where}: {role} {tensor_name!r} is {kind} in the model, "
                              f"{pb2.DataType.Name(data_type)} in config.pbtxt")
        shape = [d.dim_value if d.HasField("dim_value") else -1
                 for d in value.type.tensor_type.shape.dim]
        if shape != batch + list(dims):
            raise ExportError(f"{where}: {role} {tensor_name!r} has shape {shape} in the model, "
                              f"{batch + list(dims)} by config.pbtxt")

    for tensor in config.input:
        check(tensor.name, tensor.data_type, tensor.dims, onnx_inputs, "input")
    for tensor in config.output:
        check(tensor.name, tensor.data_type, tensor.dims, onnx_outputs, "output")
    for state in config.sequence_batching.state:
        check(state.input_name, state.data_type, state.dims, onnx_inputs, "state input")
        check(state.output_name, state.data_type, state.dims, onnx_outputs, "state output")
        for initial in state.initial_state:
            path = where / INITIAL_STATE_DIR / initial.data_file
            expected = 4 * int(np.prod(list(initial.dims)))
            if not path.is_file() or path.stat().st_size != expected:
                raise ExportError(f"{where}: initial state {path.name!r} must hold {expected} "
                                  f"bytes (float32 {list(initial.dims)})")
    declared = ({t.name for t in config.input}
                | {s.input_name for s in config.sequence_batching.state})
    if declared != set(onnx_inputs):
        raise ExportError(f"{where}: the ONNX model's inputs {sorted(onnx_inputs)} are not "
                          f"all fed by config.pbtxt ({sorted(declared)})")


_TRITON_TO_TORCH = {"TYPE_FP32": "float32", "TYPE_INT64": "int64"}


def _match_torchscript(config, path: Path, pb2, where: Path) -> None:
    r"""The PyTorch backend's view of a TorchScript model: every tensor named ``<name>__<index>``,
    the inputs (and state input) covering forward's arguments, and the outputs the model returns
    on a call shaped by config.pbtxt (batch 2 where a dimension is variable)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's, on every call
        module = torch.jit.load(str(path), map_location="cpu").eval()
    batch = [2] if config.max_batch_size > 0 else []  # Triton's batch axis, not in dims
    state = list(config.sequence_batching.state)
    feeds = [(t.name, t.data_type, batch + list(t.dims)) for t in config.input] + \
        [(s.input_name, s.data_type, list(s.dims)) for s in state]
    fetches = [(t.name, t.data_type, batch + list(t.dims)) for t in config.output] + \
        [(s.output_name, s.data_type, list(s.dims)) for s in state]
    arity = len(module.forward.schema.arguments) - 1  # without self
    positions = [_position(name, where) for name, _, _ in feeds]
    if sorted(positions) != list(range(arity)):
        raise ExportError(f"{where}: the inputs' indices {sorted(positions)} do not cover the "
                          f"model's {arity} forward arguments")

    def dtype_of(data_type) -> str:
        name = pb2.DataType.Name(data_type)
        if name not in _TRITON_TO_TORCH:
            raise ExportError(f"{where}: {name} is none of the model's types "
                              f"({', '.join(_TRITON_TO_TORCH)})")
        return _TRITON_TO_TORCH[name]

    arguments = [None] * arity
    for (name, data_type, dims), index in zip(feeds, positions):
        arguments[index] = torch.zeros([2 if d == -1 else d for d in dims],
                                       dtype=getattr(torch, dtype_of(data_type)))
    try:
        with torch.inference_mode():
            returned = module(*arguments)
    except RuntimeError as err:
        raise ExportError(f"{where}: the model refuses inputs shaped as config.pbtxt says "
                          f"({str(err).strip().splitlines()[0][:160]})") from None
    returned = returned if isinstance(returned, tuple) else (returned,)
    for name, data_type, dims in fetches:
        index = _position(name, where)
        if index >= len(returned):
            raise ExportError(f"{where}: output {name!r} asks for result {index}; the model "
                              f"returns {len(returned)}")
        value = returned[index]
        wanted = [2 if d == -1 else d for d in dims]
        kind = dtype_of(data_type)
        if list(value.shape) != wanted or str(value.dtype) != f"torch.{kind}":
            raise ExportError(f"{where}: output {name!r} is {value.dtype} {list(value.shape)} "
                              f"from the model, {kind} {wanted} by config.pbtxt")


def _position(name: str, where: Path) -> int:
    stem, _, index = name.rpartition("__")
    if not stem or not index.isdigit():
        raise ExportError(f"{where}: {name!r} does not follow the PyTorch backend's "
                          f"<name>__<index> naming")
    return int(index)
