"""The plastic model and its bundle: the trace as explicit state, a session that keeps learning.

Unit tests on a random network (no MNIST) for the maths; then one real run (the session's
``served`` DHP run, trained on MNIST) exported with ``--plastic`` and served on every backend.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from dhp_deploy.bundle import BundleError
from dhp_deploy.export import benchmark_of_run, export_run
from dhp_deploy.network import DHPNet
from dhp_deploy.plastic import plastic_model, reference_step
from dhp_deploy.plastic_session import PlasticSession
from dhp_deploy.sessions import verify_bundle
from dhp_deploy.run_dir import load_model
from dhp_deploy.runtime import InputError, open_bundle

from cli_helpers import assert_one_line_error, run_cli


def random_net() -> DHPNet:
    torch.manual_seed(0)
    net = DHPNet(hidden=(32, 16), dhp=True).eval()
    with torch.no_grad():
        net.head.hebb.uniform_(0.0, 1.0)
        net.head.alpha.uniform_(-0.3, 0.3)
        net.head.eta.fill_(0.2)
    return net


@pytest.mark.parametrize("labels", [[0, 3, -1, 3, 9, -1, 0], [5] * 7, [-1, 2, -1, -1, -1, -1, -1]])
def test_plastic_model_is_the_eager_layer_on_labelled_rows(labels):
    net = random_net()
    x, y, hebb = torch.rand(7, 784), torch.tensor(labels), net.head.hebb.clone()
    expected = reference_step(net, x, y, hebb)
    for model in (plastic_model(net), torch.jit.script(plastic_model(net))):
        logits, hebb_out = model(x, y, hebb)
        torch.testing.assert_close(logits, expected[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(hebb_out, expected[1], rtol=1e-6, atol=1e-7)
        absent = [c for c in range(10) if c not in labels]
        assert torch.equal(hebb_out[:, absent], hebb[:, absent])  # classes without a label


def test_an_unlabelled_call_returns_the_trace_bit_for_bit():
    net = random_net()
    hebb = net.head.hebb.clone()
    _, hebb_out = plastic_model(net)(torch.rand(4, 784), torch.full((4,), -1), hebb)
    assert torch.equal(hebb_out, hebb)


def test_a_non_finite_unlabelled_row_does_not_reach_the_trace():
    # The trace learns the labelled rows only: an unlabelled row holding NaN must not reach any
    # class's mean (through the one-hot matmul's 0 · NaN), in the exported graphs too.
    net = random_net()
    x, hebb = torch.rand(4, 784), net.head.hebb.clone()
    x[1, 5] = float("nan")
    y = torch.tensor([2, -1, 7, 2])
    expected = reference_step(net, x, y, hebb)[1]
    for model in (plastic_model(net), torch.jit.script(plastic_model(net))):
        logits, hebb_out = model(x, y, hebb)
        assert torch.isnan(logits[1]).all() and torch.isfinite(logits[[0, 2, 3]]).all()
        torch.testing.assert_close(hebb_out, expected, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(hebb_out).all()


def test_a_plain_head_has_no_plastic_model():
    with pytest.raises(ValueError, match="DHP head"):
        plastic_model(DHPNet(hidden=(8,), dhp=False))


# ----------------------------------------------------------------- a real run, exported plastic


@pytest.fixture(scope="module")
def plastic_bundle(served, tmp_path_factory, data_dir):
    run, _ = served
    out = tmp_path_factory.mktemp("plastic") / "bundle"
    export_run(run, out, ("torchscript", "onnx", "pt2"), data_dir=data_dir, plastic=True,
               verify=verify_bundle)
    return out


def test_the_manifest_says_plastic_and_documents_the_io(plastic_bundle):
    manifest = json.loads((plastic_bundle / "manifest.json").read_text())
    assert manifest["plastic"] is True and manifest["model"]["head"] == "dhp-plastic"
    io = manifest["plastic_io"]
    assert [i["name"] for i in io["inputs"]] == ["input", "labels", "hebb"]
    assert [o["name"] for o in io["outputs"]] == ["logits", "hebb_out"]
    assert np.load(plastic_bundle / "hebb.npy").shape == tuple(io["initial_state"]["shape"])


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "pt2"])
def test_a_stream_of_real_batches_matches_the_eager_layer(served, plastic_bundle, data_dir,
                                                          backend):
    # 24 calls on real test images: sizes 1..64, every fourth row unlabelled, one call all
    # unlabelled; logits and the trace after every call against the eager layer.
    run, _ = served
    model, payload = load_model(run)
    tasks = benchmark_of_run(payload, data_dir).tasks
    x = torch.cat([t.x_test[:80] for t in tasks])
    y = torch.cat([t.y_test[:80] for t in tasks])
    y[3::4] = -1
    session = PlasticSession(plastic_bundle, backend=backend)
    hebb, start = model.head.hebb.clone(), 0
    for call, size in enumerate([1, 7, 64, 2, 13, 5, 33, 1] * 3):
        rows = slice(start, start + size)
        labels = y[rows].clone()
        if call == 5:
            labels[:] = -1
        before = session.hebb.copy()
        logits = session.step(x[rows].numpy(), labels.numpy())
        expected_logits, hebb = reference_step(model, x[rows], labels, hebb)
        np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(session.hebb, hebb.numpy(), rtol=1e-4, atol=1e-6)
        if call == 5:
            assert np.array_equal(session.hebb, before)
        start += size
    assert not np.allclose(session.hebb, session.initial)  # the trace did learn
    assert session.check()["ok"]


def test_predict_never_moves_the_trace_and_reset_restores_it(plastic_bundle):
    session = PlasticSession(plastic_bundle, backend="onnx")
    x = np.load(plastic_bundle / "golden_inputs.npy")[:8]
    session.predict(x)
    assert np.array_equal(session.hebb, session.initial)
    session.learn(x, np.arange(8, dtype=np.int64) % 10)
    assert not np.array_equal(session.hebb, session.initial)
    session.reset()
    assert np.array_equal(session.hebb, session.initial)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 10]), r"labels must be class ids in \[0, 10\) or -1 \(no label\); got 10"),
    (np.array([0, -2]), "got -2"),
    (np.array([0.0, 1.0]), r"labels must be int64 \(2,\), got float64"),
    (np.array([0, 1, 2]), r"labels must be int64 \(2,\), got int64 \[3\]"),
])
def test_bad_labels_give_one_line_errors(plastic_bundle, labels, message):
    session = PlasticSession(plastic_bundle, backend="onnx")
    with pytest.raises(InputError, match=message):
        session.step(np.zeros((2, 784), np.float32), labels)


def test_a_wrong_trace_and_the_wrong_bundle_kind_are_refused(served, plastic_bundle):
    session = PlasticSession(plastic_bundle, backend="torchscript")
    with pytest.raises(InputError, match=r"hebb must be float32 \[64, 10\]"):
        session.set_state(np.zeros((10, 64), np.float32))
    _, frozen = served
    with pytest.raises(BundleError, match="frozen bundle"):
        PlasticSession(frozen)
    with pytest.raises(BundleError, match="plastic bundle"):
        open_bundle(plastic_bundle)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_trace_is_refused_by_set_state(plastic_bundle, bad):
    session = PlasticSession(plastic_bundle, backend="onnx")
    trace = session.initial.copy()
    trace[3, 4] = bad
    with pytest.raises(InputError, match=r"hebb holds NaN or infinite values in 1 element"):
        session.set_state(trace)
    assert np.array_equal(session.hebb, session.initial)


def test_learn_without_labels_is_refused(plastic_bundle):
    session = PlasticSession(plastic_bundle, backend="onnx")
    with pytest.raises(InputError, match="learn needs labels") as caught:
        session.learn(np.zeros((2, 784), np.float32), None)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "pt2"])
def test_a_learn_call_that_would_break_the_trace_is_refused_and_keeps_it(plastic_bundle,
                                                                         backend):
    # Finite but extreme pixels overflow the hidden units to inf; a NaN pixel (allowed through)
    # spreads NaN: either would leave every later logit NaN. The trace before the call must
    # survive bit for bit, and the session go on as if the call never happened.
    session = PlasticSession(plastic_bundle, backend=backend)
    x = np.load(plastic_bundle / "golden_inputs.npy")[:4]
    labels = np.array([0, 1, 2, -1], dtype=np.int64)
    session.learn(x, labels)
    good = session.hebb
    extreme = np.full_like(x, 3e38)
    nan = x.copy()
    nan[0, 0] = np.nan  # in a labelled row: its class mean is NaN
    for bad, allow in ((extreme, False), (nan, True)):
        with pytest.raises(InputError, match="would make the trace NaN or infinite.*unchanged"):
            session.step(bad, labels, allow_nonfinite=allow)
        assert session.hebb.tobytes() == good.tobytes()
    # Predict-only calls never move the trace, whatever their rows hold.
    logits = session.predict(nan, allow_nonfinite=True)
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1:]).all()
    assert session.hebb.tobytes() == good.tobytes()
    session.learn(x, labels)
    assert np.isfinite(session.hebb).all() and not np.array_equal(session.hebb, good)


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "pt2"])
def test_threads_sharing_a_session_lose_no_update(plastic_bundle, backend):
    # 4 threads x 60 predict-then-learn calls on one session. Each call takes effect in the order
    # it acquires the session's lock, recorded inside the lock (the backend's run is called
    # under it): a serial replay of that order on a fresh session must return the same logits
    # call by call and end with the same trace. Without the lock updates are lost and it differs.
    session = PlasticSession(plastic_bundle, backend=backend)
    admitted = []
    run = session._state.run

    def recording_run(x, labels):
        logits = run(x, labels)
        admitted.append((x, labels, logits))
        return logits

    session._state.run = recording_run
    x = np.load(plastic_bundle / "golden_inputs.npy")
    labels = np.load(plastic_bundle / "golden_stream_labels.npy")  # a third of them -1

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(60):
            rows = rng.choice(len(x), size=3, replace=False)
            session.step(x[rows], labels[rows])

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(worker, seed) for seed in range(4)]:
            future.result()
    assert len(admitted) == 240
    replay = PlasticSession(plastic_bundle, backend=backend)
    for inputs, call_labels, logits in admitted:
        np.testing.assert_array_equal(replay.step(inputs, call_labels), logits)
    assert replay.hebb.tobytes() == session.hebb.tobytes()


def test_cli_exports_and_checks_a_plastic_bundle(served, tmp_path, data_dir):
    run, _ = served
    out = tmp_path / "bundle"
    exported = run_cli("export", run, "--plastic", "--format", "onnx", "--out", out,
                       "--data-dir", data_dir)
    assert exported.returncode == 0, exported.stderr
    checked = run_cli("serve", "check", out)
    assert checked.returncode == 0, checked.stderr
    assert "onnx/cpu (plastic): 23 calls" in checked.stdout and "OK" in checked.stdout
    too_few = run_cli("export", run, "--plastic", "--golden", "10", "--out", tmp_path / "b2",
                      "--data-dir", data_dir)
    assert_one_line_error(too_few, "at least 60 rows")
    assert not (tmp_path / "b2").exists()


# ----------------------------------------------------------------- a Triton model repository


@pytest.fixture(scope="module")
def triton_repo(served, tmp_path_factory, data_dir):
    from dhp_deploy.triton import write_triton_repository

    run, _ = served
    return write_triton_repository(run, tmp_path_factory.mktemp("triton") / "repo",
                                   data_dir=data_dir, verify=verify_bundle)


def test_every_generated_config_parses_with_tritons_schema_and_fits_its_model(served,
                                                                              triton_repo):
    from dhp_deploy.triton import validate_repository

    configs = validate_repository(triton_repo)
    frozen, plastic = configs["dhp"], configs["dhp_plastic"]
    assert frozen.max_batch_size > 0 and frozen.dynamic_batching.max_queue_delay_microseconds > 0
    assert frozen.instance_group[0].kind == frozen.instance_group[0].KIND_GPU
    (state,) = plastic.sequence_batching.state
    assert (state.input_name, state.output_name) == ("hebb", "hebb_out")
    trace = np.fromfile(triton_repo / "dhp_plastic" / "initial_state" / "hebb", np.float32)
    model, _ = load_model(served[0])
    assert np.array_equal(trace.reshape(list(state.dims)), model.head.hebb.numpy())
    # The same models for Triton's PyTorch backend, named by its <name>__<index> convention.
    ts_frozen, ts_plastic = configs["dhp_torchscript"], configs["dhp_plastic_torchscript"]
    assert (ts_frozen.backend, ts_frozen.input[0].name) == ("pytorch", "input__0")
    assert [t.name for t in ts_plastic.input] == ["input__0", "labels__1"]
    (ts_state,) = ts_plastic.sequence_batching.state
    assert (ts_state.input_name, ts_state.output_name) == ("hebb__2", "hebb_out__1")
    assert (triton_repo / "dhp_plastic_torchscript" / "initial_state" / "hebb").read_bytes() \
        == trace.tobytes()


@pytest.mark.parametrize("model, edit, problem", [
    ("dhp_plastic", lambda text: text.replace("max_batch_size", "max_batch"),
     "not a Triton ModelConfig"),
    ("dhp_plastic", lambda text: text.replace('name: "labels"', 'name: "label"'),
     "'label' is not in the ONNX"),
    ("dhp_plastic", lambda text: text.replace("TYPE_INT64", "TYPE_INT32"),
     "TYPE_INT64 in the model"),
    ("dhp_plastic", lambda text: text.replace('output_name: "hebb_out"', 'output_name: "hebb"'),
     "state output 'hebb' is not in the ONNX"),
    ("dhp_plastic_torchscript", lambda text: text.replace('"labels__1"', '"labels__3"'),
     "do not cover the model's 3"),
    ("dhp_plastic_torchscript", lambda text: text.replace('"hebb_out__1"', '"hebb_out"'),
     "<name>__<index> naming"),
    ("dhp_plastic_torchscript", lambda text: text.replace('"hebb_out__1"', '"hebb_out__0"'),
     "from the model"),
])
def test_a_broken_config_is_refused(triton_repo, tmp_path, model, edit, problem):
    import shutil

    from dhp_deploy.export import ExportError
    from dhp_deploy.triton import validate_repository

    broken = tmp_path / "repo"
    shutil.copytree(triton_repo, broken)
    config = broken / model / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    record = json.loads((broken / "repository.json").read_text())
    record["sha256"].pop(f"{model}/config.pbtxt")  # the edit, not the checksum, is tested
    (broken / "repository.json").write_text(json.dumps(record))
    with pytest.raises(ExportError, match=problem):
        validate_repository(broken)


def test_cli_writes_a_triton_repository_or_nothing(served, tmp_path, data_dir):
    run, _ = served
    result = run_cli("export", run, "--format", "triton", "--triton-cpu", "--out",
                     tmp_path / "repo", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert "KIND_CPU" in (tmp_path / "repo" / "dhp" / "config.pbtxt").read_text()
    again = run_cli("export", run, "--format", "triton", "--out", tmp_path / "repo",
                    "--data-dir", data_dir)
    assert_one_line_error(again, "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temporary left behind


@pytest.mark.parametrize("args, phrase", [
    (["--format", "triton", "--plastic"], "--plastic does not apply to --format triton"),
    (["--format", "triton", "--pt2-device", "cpu"], "--pt2-device applies to --format pt2 or all"),
    (["--format", "onnx", "--pt2-device", "cpu"], "not onnx (which writes no .pt2)"),
    (["--triton-cpu"], "--triton-cpu applies to --format triton only, not all"),
    (["--format", "torchscript", "--triton-sequences", "2"], "--triton-sequences applies to"),
])
def test_export_refuses_options_its_format_would_ignore(served, tmp_path, args, phrase):
    result = run_cli("export", served[0], *args, "--out", tmp_path / "out")
    assert_one_line_error(result, phrase, exit_code=2)
    assert not (tmp_path / "out").exists()


def test_export_names_an_out_parent_that_is_a_file(served, tmp_path):
    (tmp_path / "file").write_text("")  # export's mkdir said only "File exists"
    for fmt in ("onnx", "triton"):
        result = run_cli("export", served[0], "--format", fmt, "--out",
                         tmp_path / "file" / "sub" / "bundle")
        assert_one_line_error(result, f"{tmp_path / 'file'} is a file, not a directory",
                              exit_code=2)
    help_text = run_cli("export", "--help").stdout
    assert "export/triton/<RUN_DIR name>" in " ".join(help_text.split())


def test_the_pt2_state_moves_and_outputs_are_not_reused_buffers(plastic_bundle):
    # An AOTInductor package may reuse its output buffers: a trace kept from one call must not
    # change under the next call (the stream check caught exactly that before the copy).
    session = PlasticSession(plastic_bundle, backend="pt2")
    x = np.load(plastic_bundle / "golden_inputs.npy")[:6]
    labels = np.array([0, 1, 2, 3, -1, 1], dtype=np.int64)
    first_logits = session.step(x, labels)
    first_trace, kept = session.hebb, session.hebb.copy()
    session.step(x, labels)
    assert np.array_equal(first_trace, kept) and not np.array_equal(session.hebb, kept)
    kept_logits = first_logits.copy()
    session.step(x, labels)
    assert np.array_equal(first_logits, kept_logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_torchscript_and_a_cuda_pt2_replay_the_stream(served, plastic_bundle, tmp_path,
                                                              data_dir):
    # The plastic golden stream (23 calls, the trace fed back) on the GPU: TorchScript from the
    # CPU bundle, and .pt2 packages compiled for CUDA, frozen and plastic (dhp-export
    # --pt2-device cuda), each checked against the eager CPU goldens.

    assert PlasticSession(plastic_bundle, backend="torchscript", device="cuda").check()["ok"]
    run, _ = served
    plastic = export_run(run, tmp_path / "plastic", ("pt2",), data_dir=data_dir, plastic=True,
                         verify=verify_bundle, pt2_device="cuda")
    session = PlasticSession(plastic, backend="pt2", device="cuda")
    report = session.check()
    assert report["ok"], report
    print(f"cuda pt2 plastic stream: max logit error {report['max_abs_error']:.3g}, "
          f"max trace error {report['max_trace_error']:.3g}")
    with pytest.raises(BundleError, match="compiled for cuda"):
        PlasticSession(plastic, backend="pt2", device="cpu")
    frozen = export_run(run, tmp_path / "frozen", ("pt2",), data_dir=data_dir,
                        verify=verify_bundle, pt2_device="cuda")
    frozen_report = open_bundle(frozen, backend="pt2", device="cuda").check()
    assert frozen_report["ok"], frozen_report


def test_the_onnx_session_refuses_cuda_without_the_cuda_provider(plastic_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BundleError, match="no CUDAExecutionProvider") as caught:
        PlasticSession(plastic_bundle, backend="onnx", device="cuda")
    assert "\n" not in str(caught.value)
