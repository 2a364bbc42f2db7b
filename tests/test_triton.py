"""``dhp-serve check REPO`` on a Triton model repository, and ``--triton-sequences``.

One repository is exported from the session's ``served`` run by the real ``dhp-export`` command
(3 concurrent sequences, CPU instances). The intact copy passes ``dhp-serve check``; each broken
copy fails it with one ``Error:`` line naming the part (run in-process with click's runner: a
subprocess per case would cost a Python and torch start-up each on a 2-core CI host).

Where the nvidia-pytriton wheel is installed (not in the project's environment: it wants
numpy < 2), its ``tritonserver`` binary (CPU, Python backend only) serves a Python-backend model
over PlasticSession, and two interleaved sequences with real correlation IDs keep their own
traces. Run it in a separate environment, e.g. one with ``numpy<2``, ``nvidia-pytriton`` and
the project's site-packages added after its own.
"""

import importlib.util
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from dhp_deploy.bundle import sha256_file
from dhp_deploy.cli.serve import main as serve_main

from cli_helpers import assert_one_line_error, run_cli

SEQUENCES = 3


@pytest.fixture(scope="module")
def repo(served, tmp_path_factory, data_dir):
    run, _ = served
    out = tmp_path_factory.mktemp("triton") / "repo"
    result = run_cli("export", run, "--format", "triton", "--triton-cpu", "--triton-sequences",
                     SEQUENCES, "--out", out, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert f"{SEQUENCES} concurrent sequence(s)" in result.stdout
    return out


def test_an_intact_repository_passes_dhp_serve_check(repo):
    result = run_cli("serve", "check", repo)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.endswith("sha256 OK") for line in lines), lines
    plastic = [line for line in lines if line.startswith("dhp_plastic ")]
    assert f"{SEQUENCES} concurrent sequence(s)" in plastic[0], lines


def test_the_sequences_option_sets_the_plastic_instances_and_is_documented(repo):
    from dhp_deploy.triton import ONNX_IR_REQUIREMENTS, validate_repository

    configs = validate_repository(repo)
    for name in ("dhp_plastic", "dhp_plastic_torchscript"):
        (group,) = configs[name].instance_group
        assert (group.count, group.KIND_CPU) == (SEQUENCES, group.kind), name
    assert configs["dhp"].instance_group[0].count == 1  # the frozen model batches instead
    record = json.loads((repo / "repository.json").read_text())
    trace = np.fromfile(repo / "dhp_plastic" / "initial_state" / "hebb", np.float32)
    assert record["plastic_sequences"] == SEQUENCES
    assert record["memory"]["trace_bytes_per_live_sequence"] == trace.nbytes
    # The table's requirement applies to what the exporter really wrote.
    import onnx

    model = onnx.load(str(repo / "dhp_plastic" / "1" / "model.onnx"))
    assert record["requires"]["onnx_ir_version"] == model.ir_version in ONNX_IR_REQUIREMENTS
    readme = (repo / "README.md").read_text()
    for phrase in (f"{SEQUENCES} sequence(s) at once", "sequence_end=True",
                   record["requires"]["triton_server"], f"{trace.nbytes:,} bytes"):
        assert phrase in readme, phrase


def _edit(repo, relative: str, old: str, new: str):
    r"""Replace ``old`` by ``new`` in a repository file and record its new sha256, so the check
    that fails is the one under test, not the checksum."""
    path = repo / relative
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
    _rehash(repo, path)


def _rehash(repo, path):
    record = json.loads((repo / "repository.json").read_text())
    record["sha256"][str(path.relative_to(repo))] = sha256_file(path)
    (repo / "repository.json").write_text(json.dumps(record))


def _garble(repo, relative: str):
    path = repo / relative
    path.write_bytes(b"not a model")
    _rehash(repo, path)


BROKEN = {
    "no repository.json": (lambda r: (r / "repository.json").unlink(),
                           "repository.json is missing"),
    "repository.json not JSON": (lambda r: (r / "repository.json").write_text("{"),
                                 "repository.json is not readable JSON"),
    "no model.onnx": (lambda r: (r / "dhp" / "1" / "model.onnx").unlink(),
                      "dhp/1/model.onnx is missing"),
    "no model.pt": (lambda r: (r / "dhp_plastic_torchscript" / "1" / "model.pt").unlink(),
                    "dhp_plastic_torchscript/1/model.pt is missing"),
    "no config.pbtxt": (lambda r: (r / "dhp_plastic" / "config.pbtxt").unlink(),
                        "dhp_plastic/config.pbtxt is missing"),
    "no initial state": (lambda r: (r / "dhp_plastic" / "initial_state" / "hebb").unlink(),
                         "initial_state/hebb is missing"),
    "a changed model": (lambda r: (r / "dhp" / "1" / "model.onnx").open("ab").write(b"\0"),
                        "dhp/1/model.onnx fails its sha256 check"),
    "a stray model version": (lambda r: shutil.copytree(r / "dhp" / "1", r / "dhp" / "2"),
                              "dhp/2/model.onnx is not part of the exported repository"),
    "a name unlike its folder": (
        lambda r: _edit(r, "dhp_plastic/config.pbtxt", 'name: "dhp_plastic"',
                        'name: "dhp_plastic2"'), "differs from its folder 'dhp_plastic'"),
    "another backend": (lambda r: _edit(r, "dhp/config.pbtxt", '"onnxruntime"', '"pytorch"'),
                        "backend 'pytorch', the model file needs 'onnxruntime'"),
    "fewer instances": (lambda r: _edit(r, "dhp_plastic/config.pbtxt",
                                        f"count: {SEQUENCES}", "count: 1"),
                        f"1 instance(s), repository.json says {SEQUENCES} concurrent"),
    "a garbled ONNX model": (lambda r: _garble(r, "dhp_plastic/1/model.onnx"),
                             "not a readable ONNX model"),
    "a garbled TorchScript model": (lambda r: _garble(r, "dhp_torchscript/1/model.pt"),
                                    "not a loadable TorchScript model"),
    "a short initial state": (lambda r: _garble(r, "dhp_plastic_torchscript/initial_state/hebb"),
                              "initial state 'hebb' must hold"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_part_fails_dhp_serve_check_in_one_line(repo, tmp_path, case):
    breaks, phrase = BROKEN[case]
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    breaks(broken)
    assert_one_line_error(check_in_process(broken), phrase, exit_code=1)


def test_a_folder_that_is_neither_bundle_nor_repository_keeps_the_bundle_error(tmp_path):
    assert_one_line_error(check_in_process(tmp_path), "manifest", exit_code=1)


def check_in_process(path) -> SimpleNamespace:
    r"""``dhp-serve check PATH`` in this process, shaped as run_cli's result."""
    result = CliRunner().invoke(serve_main, ["check", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)  # a traceback is a failure, not a one-line error
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout,
                           stderr=result.stderr)


# ------------------------------------------------ a real Triton server (the pytriton wheel's)

# A Python-backend model over PlasticSession: one session (one trace) per correlation ID, made
# at the sequence's start from the bundle's exported trace, dropped at its end. Triton hands the
# model its control inputs START / END / CORRID (direct strategy, one sequence per instance).
PYTHON_MODEL = '''
import importlib.util
import json
import os
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.bundle = parameters["bundle"]["string_value"]
        global PlasticSession
        from dhp_deploy.plastic_session import PlasticSession
        self.sessions = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            def read(name):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            sequence = int(read("CORRID").reshape(-1)[0])
            if int(read("START").reshape(-1)[0]):
                self.sessions[sequence] = PlasticSession(self.bundle, backend="onnx")
            session = self.sessions[sequence]
            logits = session.step(read("input"), read("labels"))
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("logits", logits), pb_utils.Tensor("hebb_out", session.hebb)]))
            if int(read("END").reshape(-1)[0]):
                del self.sessions[sequence]
        return responses
'''


# How two sequences can be live at once with max_batch_size 0: one per instance (the direct
# strategy, as --triton-sequences writes), or several candidate sequences on one instance (the
# oldest strategy; then only the model's own bookkeeping by CORRID keeps their traces apart).
STRATEGIES = {"direct, 2 instances": ("direct { }", 2),
              "oldest, 2 candidates on 1 instance": ("oldest { max_candidate_sequences: 2 }", 1)}


def _python_model_config(bundle, in_features: int, trace_shape, classes: int,
                         strategy: str) -> str:
    scheduling, instances = STRATEGIES[strategy]
    return f"""name: "plastic_py"
backend: "python"
max_batch_size: 0
input [
  {{ name: "input" data_type: TYPE_FP32 dims: [ -1, {in_features} ] }},
  {{ name: "labels" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {classes} ] }},
  {{ name: "hebb_out" data_type: TYPE_FP32 dims: [ {trace_shape[0]}, {trace_shape[1]} ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  {scheduling}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
}}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "bundle" value: {{ string_value: "{bundle}" }} }}
"""


def _python_backend(pytriton_dir, where):
    r"""A copy of the wheel's Python backend with the stub for this Python. The stub embeds
    libpython and ignores PYTHONPATH, and its utils module is the first thing it imports: our copy
    of that module puts this interpreter's sys.path first, so the stub finds dhp_deploy and this
    environment's numpy (below 2, as pytriton requires: with numpy 2.4 the stub of pytriton 0.7.0
    returned empty output tensors)."""
    import sys

    backends = where / "backends"
    shutil.copytree(pytriton_dir / "tritonserver" / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(pytriton_dir / "tritonserver" / "python_backend_stubs" / version /
                "triton_python_backend_stub", backends / "python")
    utils = backends / "python" / "triton_python_backend_utils.py"
    paths = [path for path in sys.path if path]
    utils.write_text(f"import sys\nsys.path[:0] = {paths!r}\n" + utils.read_text())
    return backends


def _start_tritonserver(pytriton_dir, repo, backends, log):
    import socket
    import subprocess
    import sysconfig

    ports = []
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    libraries = [str(pytriton_dir.parent / "nvidia_pytriton.libs"),  # the wheel's own
                 sysconfig.get_config_var("LIBDIR")]  # this Python's libpython, for the stub
    server = subprocess.Popen(
        [str(pytriton_dir / "tritonserver" / "bin" / "tritonserver"), f"--model-repository={repo}",
         f"--backend-directory={backends}", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
         f"--metrics-port={ports[2]}", "--allow-metrics=false", "--exit-timeout-secs=2"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "LD_LIBRARY_PATH": ":".join(libraries)})
    return server, f"127.0.0.1:{ports[0]}"


def _wait_until_ready(server, client, log_path, limit_s: float = 120) -> None:
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:
            if client.is_server_ready():
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"tritonserver not ready after {limit_s} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None,
                    reason="needs the nvidia-pytriton wheel (its tritonserver, Python backend)")
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_real_triton_server_keeps_interleaved_sequences_apart(served, tmp_path, data_dir,
                                                                strategy):
    import subprocess
    from pathlib import Path

    import pytriton
    import tritonclient.http as http

    from dhp_deploy.export import export_run
    from dhp_deploy.plastic_session import PlasticSession

    bundle = export_run(served[0], tmp_path / "bundle", ("onnx",), plastic=True,
                        data_dir=data_dir)
    x = np.load(bundle / "golden_inputs.npy")[:6]
    trace = np.load(bundle / "hebb.npy")
    repo = tmp_path / "repo"
    (repo / "plastic_py" / "1").mkdir(parents=True)
    (repo / "plastic_py" / "1" / "model.py").write_text(PYTHON_MODEL)
    (repo / "plastic_py" / "config.pbtxt").write_text(
        _python_model_config(bundle, x.shape[1], trace.shape, 10, strategy))
    pytriton_dir = Path(pytriton.__file__).parent
    backends = _python_backend(pytriton_dir, tmp_path)
    log_path = tmp_path / "tritonserver.log"
    with log_path.open("w") as log:
        server, address = _start_tritonserver(pytriton_dir, repo, backends, log)
    try:
        client = http.InferenceServerClient(address)
        _wait_until_ready(server, client, log_path)

        def call(sequence, labels, start=False, end=False):
            inputs = [http.InferInput("input", list(x.shape), "FP32"),
                      http.InferInput("labels", [len(labels)], "INT64")]
            inputs[0].set_data_from_numpy(x)
            inputs[1].set_data_from_numpy(np.asarray(labels, np.int64))
            result = client.infer("plastic_py", inputs, sequence_id=sequence,
                                  sequence_start=start, sequence_end=end)
            return result.as_numpy("logits"), result.as_numpy("hebb_out")

        streams = {101: [[0, 1, 2, 3, 4, 5], [0, 0, -1, 1, 1, 1], [-1] * 6],
                   202: [[9, 8, 7, 6, 5, 4], [9, 9, 9, -1, 8, 8], [-1] * 6]}
        replay = {sequence: PlasticSession(bundle, backend="onnx") for sequence in streams}
        for step in range(3):  # interleaved: 101, 202, 101, 202, ...
            for sequence, labels in streams.items():
                logits, hebb = call(sequence, labels[step], start=step == 0, end=step == 2)
                expected = replay[sequence].step(x, np.asarray(labels[step], np.int64))
                np.testing.assert_array_equal(logits, expected)
                np.testing.assert_array_equal(hebb, replay[sequence].hebb)
        assert not np.array_equal(replay[101].hebb, replay[202].hebb)
        # Both ended, so a new sequence gets a slot and starts from the exported trace.
        _, hebb = call(303, [-1] * 6, start=True, end=True)
        np.testing.assert_array_equal(hebb, trace)
    finally:  # SIGTERM: the server stops its Python stubs (SIGKILL would orphan them)
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
