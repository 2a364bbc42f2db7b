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

Both ONNX files are the artifacts of bundles that were verified against their goldens (the
frozen one-shot goldens, the plastic golden stream) before the repository was assembled, and
the whole repository is written beside ``REPO`` and renamed into place, or not at all.

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
           "FROZEN_MODEL",
           "PLASTIC_MODEL", "REPOSITORY_FILE"]

FROZEN_MODEL, PLASTIC_MODEL = "dhp", "dhp_plastic"
REPOSITORY_FILE = "repository.json"
INITIAL_STATE_DIR, INITIAL_STATE_FILE = "initial_state", "hebb"
MAX_BATCH_SIZE = 4096  # the frozen model's largest server-side batch
MAX_QUEUE_DELAY_US = 100  # dynamic batching: how long a request may wait for others


def frozen_config(in_features: int, num_classes: int, gpu: bool = True) -> str:
    r"""config.pbtxt of the frozen model (Triton's ModelConfig in protobuf text format)."""
    return f"""name: "{FROZEN_MODEL}"
backend: "onnxruntime"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {in_features} ] }}
]
output [
  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {num_classes} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}
instance_group [ {{ count: 1 kind: {"KIND_GPU" if gpu else "KIND_CPU"} }} ]
"""


def plastic_config(in_features: int, hidden: int, num_classes: int, gpu: bool = True) -> str:
    r"""config.pbtxt of the plastic model: sequence batching, the trace as implicit state."""
    return f"""name: "{PLASTIC_MODEL}"
backend: "onnxruntime"
max_batch_size: 0
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ -1, {in_features} ] }},
  {{ name: "{LABELS_NAME}" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ -1, {num_classes} ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  direct {{ }}
  state [
    {{
      input_name: "{HEBB_NAME}"
      output_name: "{HEBB_OUT_NAME}"
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
            bundles[name] = export_run(run_dir, work / f"bundle-{name}", ("onnx",),
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
    configs = {FROZEN_MODEL: frozen_config(in_features, num_classes, gpu),
               PLASTIC_MODEL: plastic_config(in_features, hebb.shape[0], num_classes, gpu)}
    for name, bundle in bundles.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(bundle / ARTIFACT_FILES["onnx"], repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(configs[name])
    state = repo / PLASTIC_MODEL / INITIAL_STATE_DIR
    state.mkdir()
    (state / INITIAL_STATE_FILE).write_bytes(np.ascontiguousarray(hebb, np.float32).tobytes())
    files = {str(path.relative_to(repo)): sha256_file(path)
             for path in sorted(repo.rglob("*")) if path.is_file()}
    record = {"format": "dhp-deploy-triton-repository", "version": 1,
              "models": {FROZEN_MODEL: "frozen (folded trace), stateless",
                         PLASTIC_MODEL: "plastic: sequence batching, implicit state hebb"},
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
    ONNX model: tensor names, element types and shapes, the implicit state pair, the initial
    state file's size, and every file's sha256. Returns ``{model: ModelConfig}``; raises
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
    for name in (FROZEN_MODEL, PLASTIC_MODEL):
        try:
            config = text_format.Parse((repo / name / "config.pbtxt").read_text(),
                                       model_config_pb2.ModelConfig())
        except text_format.ParseError as err:
            raise ExportError(f"{repo / name / 'config.pbtxt'}: not a Triton ModelConfig "
                              f"({err})") from None
        graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
        _match(config, graph, model_config_pb2, repo / name)
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
