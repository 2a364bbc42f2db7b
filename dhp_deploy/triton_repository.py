r"""A Triton model repository as dhp-export writes it: its layout (model folders, file names,
tensor names) and its validation against Triton's own configuration schema (``dhp-serve check
REPO``). Writing it is :mod:`dhp_deploy.triton`'s job. Needs no torch to read a repository's
layout or check an ONNX one; the TorchScript models' check loads torch when it runs."""

import json
from pathlib import Path

import numpy as np

from dhp_deploy.bundle import MANIFEST_NAME, ExportError, sha256_file

__all__ = ["FROZEN_MODEL", "PLASTIC_MODEL", "TRITON_BACKENDS", "REPOSITORY_FILE", "README_FILE",
           "model_name", "is_repository", "check_repository", "validate_repository"]

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


def tensor_names(backend: str, *names: str) -> list:
    # The PyTorch backend's convention: <name>__<index>, the index being the tensor's position.
    return list(names) if backend == "onnxruntime" else [f"{n}__{i}" for i, n in enumerate(names)]


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
