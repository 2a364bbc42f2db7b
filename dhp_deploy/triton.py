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
host use ``gpu=False`` (``--triton-cpu``), which writes ``KIND_CPU``.

Concurrent sequences: under the direct strategy with ``max_batch_size: 0`` Triton gives each
model instance one sequence slot (``max(1, max_batch_size)``), so the plastic models get
``instance_group { count: sequences }`` (``--triton-sequences N``): N sequences live at once, the
next one waits for a slot (a sequence ends on ``sequence_end`` or after 60 s idle). Each live
sequence costs Triton one trace (H × C float32) and each instance one copy of the model and its
runtime. The repository's own README.md says this with its figures, the minimum Triton release
(its ONNX Runtime must load the models' ONNX IR version) and how to call both models;
``dhp-serve check REPO`` runs :func:`check_repository`.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from dhp_deploy.bundle import (ARTIFACT_FILES, HEBB_FILE, HEBB_NAME, HEBB_OUT_NAME, INPUT_NAME,
                               LABELS_NAME, MANIFEST_NAME, OUTPUT_NAME, sha256_file)
from dhp_deploy.export import ExportError, _commit, export_run
from dhp_deploy.io import make_sibling_dir

__all__ = ["write_triton_repository", "validate_repository", "check_repository", "is_repository",
           "frozen_config", "plastic_config", "model_name", "triton_requirements", "FROZEN_MODEL",
           "PLASTIC_MODEL", "REPOSITORY_FILE", "README_FILE", "TRITON_BACKENDS"]

FROZEN_MODEL, PLASTIC_MODEL = "dhp", "dhp_plastic"
# Triton backend → (the bundle artifact it serves, its file name in the model version folder).
TRITON_BACKENDS = {"onnxruntime": ("onnx", "model.onnx"), "pytorch": ("torchscript", "model.pt")}
REPOSITORY_FILE, README_FILE = "repository.json", "README.md"
REPOSITORY_FORMAT, REPOSITORY_VERSION = "dhp-deploy-triton-repository", 1
INITIAL_STATE_DIR, INITIAL_STATE_FILE = "initial_state", "hebb"
MAX_BATCH_SIZE = 4096  # the frozen model's largest server-side batch
MAX_QUEUE_DELAY_US = 100  # dynamic batching: how long a request may wait for others
MAX_SEQUENCE_IDLE_US = 60_000_000  # a sequence idle this long is ended and frees its slot
# What serving an ONNX IR version needs: onnxruntime refuses a model whose IR version is newer
# than its own ("Unsupported model IR version: 10, max supported IR version: 9" from ORT 1.17).
# The Triton releases are read from triton-inference-server/server's build.py at each tag:
# 24.03 and 24.04 (2.44.0, 2.45.0) ship ORT 1.17.2 / 1.17.3, 24.05 (2.46.0) ships ORT 1.18.0.
ONNX_IR_REQUIREMENTS = {
    10: {"onnxruntime": "1.18.0", "max_opset": 21, "triton_container": "24.05",
         "triton_server": "2.46.0"},
}


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
                   backend: str = "onnxruntime", sequences: int = 1) -> str:
    r"""config.pbtxt of the plastic model: sequence batching, the trace as implicit state,
    ``sequences`` instances (one sequence slot each: ``max_batch_size: 0``, direct strategy)."""
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
  max_sequence_idle_microseconds: {MAX_SEQUENCE_IDLE_US}
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
instance_group [ {{ count: {sequences} kind: {"KIND_GPU" if gpu else "KIND_CPU"} }} ]
"""


def triton_requirements(ir_version: int, opset: int) -> dict:
    r"""The oldest onnxruntime and Triton release that serve ONNX models of this IR version and
    opset; an ExportError for a version this table does not know (rather than a guess)."""
    needs = ONNX_IR_REQUIREMENTS.get(int(ir_version))
    if needs is None or int(opset) > needs["max_opset"]:
        raise ExportError(f"ONNX IR version {ir_version} / opset {opset}: the oldest Triton "
                          f"release able to serve it is not known to dhp_deploy.triton "
                          f"(ONNX_IR_REQUIREMENTS knows IR {sorted(ONNX_IR_REQUIREMENTS)})")
    return {"onnx_ir_version": int(ir_version), "onnx_opset": int(opset),
            "onnxruntime": f">= {needs['onnxruntime']}",
            "triton_container": f"nvcr.io/nvidia/tritonserver:{needs['triton_container']}-py3 "
                                f"or later",
            "triton_server": f">= {needs['triton_server']}"}


def write_triton_repository(run_dir, out_dir, *, overwrite: bool = False, data_dir=None,
                            golden_count: int = 64, allow_unfinished: bool = False,
                            gpu: bool = True, sequences: int = 1, verify_frozen=None,
                            verify_plastic=None) -> Path:
    r"""Export ``run_dir``'s frozen and plastic ONNX models as a Triton repository at
    ``out_dir``; the plastic models serve up to ``sequences`` sequences at once. ``verify_*``
    check each bundle before it is used (as in :func:`export_run`). Raises
    :class:`ExportError`; nothing is written at ``out_dir`` then."""
    if sequences < 1:
        raise ExportError(f"sequences must be at least 1, not {sequences}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (pass overwrite / --overwrite to replace it)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = make_sibling_dir(out_dir)
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
        _assemble(repo, bundles, gpu, sequences)
        _commit(repo, out_dir, overwrite)  # flushes the repository to disk, then renames it
    except OSError as err:
        raise ExportError(f"writing the repository failed: {err}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _assemble(repo: Path, bundles: dict, gpu: bool, sequences: int) -> None:
    frozen = json.loads((bundles[FROZEN_MODEL] / MANIFEST_NAME).read_text())
    plastic = json.loads((bundles[PLASTIC_MODEL] / MANIFEST_NAME).read_text())
    requires = triton_requirements(plastic["onnx"]["ir_version"], plastic["onnx"]["opset"])
    in_features = int(frozen["input"]["shape"][1])
    num_classes = int(frozen["output"]["shape"][1])
    hebb = np.load(bundles[PLASTIC_MODEL] / HEBB_FILE, allow_pickle=False)
    for backend, (artifact, file_name) in TRITON_BACKENDS.items():
        configs = {False: frozen_config(in_features, num_classes, gpu, backend),
                   True: plastic_config(in_features, hebb.shape[0], num_classes, gpu, backend,
                                        sequences)}
        for is_plastic, config in configs.items():
            folder = repo / model_name(is_plastic, backend)
            (folder / "1").mkdir(parents=True)
            bundle = bundles[PLASTIC_MODEL if is_plastic else FROZEN_MODEL]
            shutil.copyfile(bundle / ARTIFACT_FILES[artifact], folder / "1" / file_name)
            (folder / "config.pbtxt").write_text(config)
        state = repo / model_name(True, backend) / INITIAL_STATE_DIR
        state.mkdir()
        (state / INITIAL_STATE_FILE).write_bytes(np.ascontiguousarray(hebb, np.float32).tobytes())
    files = {str(path.relative_to(repo)): sha256_file(path)
             for path in sorted(repo.rglob("*")) if path.is_file()}
    memory = {"trace_bytes_per_live_sequence": int(hebb.size) * 4,
              "model_bytes_per_instance": (repo / PLASTIC_MODEL / "1" / "model.onnx").stat()
              .st_size}
    record = {"format": REPOSITORY_FORMAT, "version": REPOSITORY_VERSION,
              "models": {model_name(is_plastic, backend): f"{kind}, {backend} backend"
                         for backend in TRITON_BACKENDS
                         for is_plastic, kind in ((False, "frozen (folded trace), stateless"),
                                                  (True, "plastic: sequence batching, implicit "
                                                         "state hebb"))},
              "training": frozen["training"], "metrics": frozen["metrics"],
              "instance_kind": "KIND_GPU" if gpu else "KIND_CPU",
              "plastic_sequences": sequences, "memory": memory, "requires": requires,
              "torchscript_written_by": f"torch {plastic['versions']['torch']}", "sha256": files}
    (repo / REPOSITORY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (repo / README_FILE).write_text(repository_readme(record, hebb.shape, in_features))


def repository_readme(record: dict, trace_shape, in_features: int) -> str:
    r"""The repository's README.md: what it needs, what concurrency costs, how to call it."""
    requires, memory = record["requires"], record["memory"]
    sequences, kind = record["plastic_sequences"], record["instance_kind"]
    hidden, classes = trace_shape
    return f"""# Triton model repository (dhp-export --format triton)

Models: `dhp` (frozen, stateless, dynamic batching) and `dhp_plastic` (keeps learning: Triton
carries each sequence's Hebbian trace as implicit state), each also as TorchScript for the
PyTorch backend (`dhp_torchscript`, `dhp_plastic_torchscript`, tensors named `<name>__<index>`).
`repository.json` records the training run, its metrics and every file's sha256;
`dhp-serve check THIS_FOLDER` checks the repository (files, checksums, every config against its
model) and fails with one line naming the first missing or inconsistent part.

## What it needs

The ONNX models are IR version {requires['onnx_ir_version']}, opset {requires['onnx_opset']}: \
ONNX Runtime {requires['onnxruntime']}, i.e. Triton
{requires['triton_container']} (server {requires['triton_server']}); older releases refuse
to load them ("Unsupported model IR version"). The TorchScript models were written by
{record['torchscript_written_by']}; whether a given Triton's LibTorch loads them was not checked.
Instances are `{kind}` (`dhp-export --triton-cpu` writes `KIND_CPU`, without it `KIND_GPU`).

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -v $PWD:/models \\
  {requires['triton_container'].split(' ')[0]} tritonserver --model-repository=/models
```

## Concurrent sequences and their memory

The plastic models serve **{sequences} sequence(s) at once** (`--triton-sequences N` at export):
with `max_batch_size: 0` and the direct strategy each model instance holds one sequence, so the
config asks for `instance_group {{ count: {sequences} }}`. One more sequence waits until a live
one ends: a client ends its sequence with `sequence_end=True` on its last request; one that never
does holds its slot until it has been idle {MAX_SEQUENCE_IDLE_US // 1_000_000} s (and a sequence
waiting for that slot waits as long).
Memory: one trace per live sequence, {hidden} × {classes} float32 = \
{memory['trace_bytes_per_live_sequence']:,} bytes, plus per instance
one copy of the model ({memory['model_bytes_per_instance']:,} bytes of ONNX) and its runtime's \
own working memory
(an ONNX Runtime session and, on a GPU, its CUDA memory arena): N sequences cost N instances.

## Calling it (`pip install 'tritonclient[http]'`)

```python
import numpy as np
import tritonclient.http as http

client = http.InferenceServerClient("localhost:8000")
x = np.random.rand(8, {in_features}).astype(np.float32)

# Frozen: stateless, batched across requests by the server.
request = http.InferInput("input", list(x.shape), "FP32"); request.set_data_from_numpy(x)
logits = client.infer("dhp", [request]).as_numpy("logits")

# Plastic: one sequence per user/stream; the server carries its trace between requests.
def call(sequence_id, x, labels, start=False, end=False):
    inputs = [http.InferInput("input", list(x.shape), "FP32"),
              http.InferInput("labels", list(labels.shape), "INT64")]
    inputs[0].set_data_from_numpy(x); inputs[1].set_data_from_numpy(labels)
    return client.infer("dhp_plastic", inputs, sequence_id=sequence_id, sequence_start=start,
                        sequence_end=end).as_numpy("logits")

call(42, x, np.full(8, -1, np.int64), start=True)  # starts from the exported trace; predict only
call(42, x, np.array([3, 1, -1, 0, 7, 7, 2, -1]))   # predict, then learn the labelled rows
call(42, x, np.full(8, -1, np.int64), end=True)    # the last request: frees the slot
```
"""


def is_repository(path) -> bool:
    r"""Whether ``path`` is (or is meant to be) a Triton model repository rather than a bundle:
    no bundle manifest, and a ``repository.json`` or one of the model folders this writes."""
    path = Path(path)
    if (path / MANIFEST_NAME).exists() or not path.is_dir():
        return False
    return (path / REPOSITORY_FILE).exists() or any(
        (path / model_name(plastic, backend)).is_dir()
        for backend in TRITON_BACKENDS for plastic in (False, True))


def check_repository(repo) -> list:
    r""":func:`validate_repository`, then one line per model saying what was checked (what
    ``dhp-serve check REPO`` prints)."""
    lines = []
    for name, config in validate_repository(repo).items():
        count = sum(group.count or 1 for group in config.instance_group)
        kinds = sorted({type(g).Kind.Name(g.kind) for g in config.instance_group}) or ["default"]
        if config.HasField("sequence_batching"):
            (state,) = config.sequence_batching.state
            serving = (f"sequence batching, {count} concurrent sequence(s), state "
                       f"{state.input_name}->{state.output_name} {list(state.dims)}")
        else:
            serving = f"max_batch_size {config.max_batch_size}, {count} instance(s)"
        parts = "config, model, initial state" if config.sequence_batching.state else \
            "config, model"
        lines.append(f"{name} ({config.backend}, {'/'.join(kinds)}): {serving}; {parts} and "
                     f"sha256 OK")
    return lines


def validate_repository(repo) -> dict:
    r"""Check a repository written by :func:`write_triton_repository`: every file present and
    equal to its sha256 in repository.json (and no unrecorded file in a model folder, which
    Triton would load), then every ``config.pbtxt`` parsed with Triton's own ModelConfig schema
    (from ``tritonclient``, strict: an unknown field or a wrong type fails), named as its folder,
    and checked against its model: for ONNX, tensor names, element types and shapes from the
    graph; for TorchScript, the ``<name>__<index>`` names against forward's arguments and a
    call's results; the implicit state pair, the initial state file's size and the plastic
    models' instance count. Returns ``{model: ModelConfig}``; raises :class:`ExportError` with
    the first problem, in one line."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise ExportError(f"validating a Triton repository needs tritonclient[grpc] ({err}): "
                          f"pip install 'dhp-deploy[triton]'") from None

    repo = Path(repo)
    record = _read_record(repo)
    _check_files(repo, record)
    configs = {}
    for backend, (_, file_name) in TRITON_BACKENDS.items():
        for plastic in (False, True):
            name = model_name(plastic, backend)
            folder = repo / name
            config = _parse_config(folder, text_format, model_config_pb2)
            _check_identity(config, name, backend, plastic, record, folder)
            model = folder / "1" / file_name
            if backend == "onnxruntime":
                _match(config, _load_onnx(model, record), model_config_pb2, folder)
            else:
                _match_torchscript(config, model, model_config_pb2, folder)
            _check_initial_state(config, folder)
            configs[name] = config
    return configs


def _expected_files() -> dict:
    r"""``{relative path: what it is}`` of every file a repository must hold."""
    files = {}
    for backend, (_, file_name) in TRITON_BACKENDS.items():
        for plastic in (False, True):
            name = model_name(plastic, backend)
            files[f"{name}/config.pbtxt"] = f"the model configuration of {name}"
            files[f"{name}/1/{file_name}"] = f"the {backend} model file of {name}"
            if plastic:
                files[f"{name}/{INITIAL_STATE_DIR}/{INITIAL_STATE_FILE}"] = \
                    f"the initial trace of {name}"
    return files


def _read_record(repo: Path) -> dict:
    path = repo / REPOSITORY_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing: not a repository written by dhp-export --format "
                          f"triton (or an incomplete copy of one)")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} is not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict) or record.get("format") != REPOSITORY_FORMAT:
        raise ExportError(f"{path}: format is not {REPOSITORY_FORMAT!r}")
    if record.get("version") != REPOSITORY_VERSION:
        raise ExportError(f"{path}: version {record.get('version')!r}, this dhp-deploy reads "
                          f"version {REPOSITORY_VERSION}")
    if not isinstance(record.get("sha256"), dict):
        raise ExportError(f"{path}: no sha256 table of the repository's files")
    return record


def _check_files(repo: Path, record: dict) -> None:
    recorded, expected = record["sha256"], _expected_files()
    for relative, what in expected.items():
        if not (repo / relative).is_file():
            raise ExportError(f"{repo / relative} is missing ({what})")
    for relative, digest in recorded.items():
        path = repo / relative
        if not path.is_file():
            raise ExportError(f"{path} is missing (listed in {REPOSITORY_FILE})")
        if sha256_file(path) != digest:
            raise ExportError(f"{path} fails its sha256 check (changed since the export)")
    for backend in TRITON_BACKENDS:
        for plastic in (False, True):
            for path in sorted((repo / model_name(plastic, backend)).rglob("*")):
                relative = str(path.relative_to(repo))
                if path.is_file() and relative not in recorded and relative not in expected:
                    # Triton would serve e.g. a stray 2/model.onnx instead of version 1.
                    raise ExportError(f"{path} is not part of the exported repository (not in "
                                      f"{REPOSITORY_FILE}); Triton would load it")


def _parse_config(folder: Path, text_format, pb2):
    path = folder / "config.pbtxt"
    try:
        return text_format.Parse(path.read_text(), pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise ExportError(f"{path}: not a Triton ModelConfig ({detail})") from None


def _check_identity(config, name: str, backend: str, plastic: bool, record: dict,
                    folder: Path) -> None:
    r"""What Triton checks on load (the name is the folder's) and what this repository
    promises: the backend of the model file, sequence batching exactly for the plastic models,
    and as many of their instances as repository.json's ``plastic_sequences``."""
    where = folder / "config.pbtxt"
    if config.name != name:
        raise ExportError(f"{where}: name {config.name!r} differs from its folder {name!r} "
                          f"(Triton refuses to load it)")
    if config.backend != backend:
        raise ExportError(f"{where}: backend {config.backend!r}, the model file needs {backend!r}")
    if config.HasField("sequence_batching") != plastic:
        raise ExportError(f"{where}: {'no' if plastic else 'a'} sequence_batching section; the "
                          f"{'plastic' if plastic else 'frozen'} model needs "
                          f"{'one' if plastic else 'none'}")
    if plastic:
        count = sum(group.count or 1 for group in config.instance_group) or 1
        wanted = int(record.get("plastic_sequences", 1))
        if count != wanted:
            raise ExportError(f"{where}: {count} instance(s), {REPOSITORY_FILE} says "
                              f"{wanted} concurrent sequence(s) (one instance each)")


def _load_onnx(path: Path, record: dict):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model "
                          f"({str(err).splitlines()[0][:160]})") from None
    wanted = record.get("requires", {}).get("onnx_ir_version")
    if wanted is not None and model.ir_version != wanted:
        raise ExportError(f"{path}: ONNX IR version {model.ir_version}, {REPOSITORY_FILE} "
                          f"states its requirements for IR {wanted}")
    return model.graph


def _check_initial_state(config, where: Path) -> None:
    for state in config.sequence_batching.state:
        for initial in state.initial_state:
            path = where / INITIAL_STATE_DIR / initial.data_file
            expected = 4 * int(np.prod(list(initial.dims)))
            if not path.is_file() or path.stat().st_size != expected:
                raise ExportError(f"{where}: initial state {path.name!r} must hold {expected} "
                                  f"bytes (float32 {list(initial.dims)})")


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
        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as err:
            raise ExportError(f"{path}: not a loadable TorchScript model "
                              f"({str(err).strip().splitlines()[0][:160]})") from None
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
