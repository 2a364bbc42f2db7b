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
from dhp_deploy.export import ExportError, _commit, check_replaceable, export_run
from dhp_deploy.io import make_sibling_dir
from dhp_deploy.triton_repository import (FROZEN_MODEL, INITIAL_STATE_DIR, INITIAL_STATE_FILE,
                                          MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US,
                                          MAX_SEQUENCE_IDLE_US, ONNX_IR_REQUIREMENTS,
                                          PLASTIC_MODEL, README_FILE, REPOSITORY_FILE,
                                          REPOSITORY_FORMAT, REPOSITORY_VERSION, TRITON_BACKENDS,
                                          check_repository, is_repository, model_name,
                                          tensor_names, validate_repository)

__all__ = ["write_triton_repository", "validate_repository", "check_repository", "is_repository",
           "frozen_config", "plastic_config", "model_name", "triton_requirements", "FROZEN_MODEL",
           "PLASTIC_MODEL", "REPOSITORY_FILE", "README_FILE", "TRITON_BACKENDS"]

def frozen_config(in_features: int, num_classes: int, gpu: bool = True,
                  backend: str = "onnxruntime") -> str:
    r"""config.pbtxt of the frozen model (Triton's ModelConfig in protobuf text format)."""
    (x,), (logits,) = tensor_names(backend, INPUT_NAME), tensor_names(backend, OUTPUT_NAME)
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
    x, labels, hebb = tensor_names(backend, INPUT_NAME, LABELS_NAME, HEBB_NAME)
    logits, hebb_out = tensor_names(backend, OUTPUT_NAME, HEBB_OUT_NAME)
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
                            gpu: bool = True, sequences: int = 1, verify=None) -> Path:
    r"""Export ``run_dir``'s frozen and plastic ONNX models as a Triton repository at
    ``out_dir``; the plastic models serve up to ``sequences`` sequences at once. ``verify``
    checks each bundle before it is used (as in :func:`export_run`). Raises
    :class:`ExportError`; nothing is written at ``out_dir`` then."""
    if sequences < 1:
        raise ExportError(f"sequences must be at least 1, not {sequences}")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, run_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = make_sibling_dir(out_dir)
    except OSError as err:
        raise ExportError(f"cannot create the repository beside {out_dir}: "
                          f"{err.strerror or err}") from None
    try:
        bundles = {}
        for name, plastic in ((FROZEN_MODEL, False), (PLASTIC_MODEL, True)):
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


