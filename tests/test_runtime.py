"""The Python runtime: verified opening, strict inputs, task heads, CPU parity and (marked) CUDA."""

import json
import shutil

import numpy as np
import pytest
import torch

from dhp_deploy.run_dir import load_model
from dhp_deploy.export import ATOL, RTOL, sha256_file
from dhp_deploy.runtime import BundleError, InputError, check_input, open_bundle, read_manifest

BACKENDS = ("torchscript", "onnx", "pt2")


@pytest.fixture
def copy(served, tmp_path):
    r"""A private copy of the bundle to damage."""
    return shutil.copytree(served[1], tmp_path / "bundle")


def golden(bundle):
    return {k: np.load(bundle / f"golden_{k}.npy") for k in ("inputs", "logits", "tasks", "labels")}


def rewrite_manifest(bundle, change):
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_passes_on_the_goldens(served, backend):
    report = open_bundle(served[1], backend=backend).check()
    assert report["ok"], report
    assert report["max_abs_error"] <= ATOL and report["argmax_agree"] == report["rows"] == 64
    assert report["task_agree"] == 64 and report["batch_sizes"] == [64, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_with_and_without_a_task_head(served, backend):
    bundle = served[1]
    runtime = open_bundle(bundle, backend=backend)
    g = golden(bundle)
    full = runtime.predict(g["inputs"])
    assert full.logits.shape == (64, 10) and full.logits.dtype == np.float32
    assert full.classes.tolist() == list(range(10))
    np.testing.assert_array_equal(full.labels, g["logits"].argmax(1))
    for task in runtime.tasks:
        head = runtime.predict(g["inputs"], task=task)
        classes = runtime.task_classes(task)
        assert head.classes.tolist() == classes.tolist() and head.logits.shape == (64, 2)
        np.testing.assert_array_equal(head.logits, full.logits[:, classes])
        np.testing.assert_array_equal(head.labels, classes[g["logits"][:, classes].argmax(1)])
    # A torch tensor is accepted as well as a numpy array.
    np.testing.assert_array_equal(runtime.logits(torch.from_numpy(g["inputs"])), full.logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_checked_not_coerced(served, backend):
    runtime = open_bundle(served[1], backend=backend)
    x = golden(served[1])["inputs"]
    cases = {
        "dtype must be float32, got float64": x.astype(np.float64),
        "dtype must be float32, got uint8": (x * 255).astype(np.uint8),
        r"shape must be \[N, 784\].*got \[784\]": x[0],
        r"got \[64, 783\]": x[:, :-1],
        r"got \[0, 784\]": x[:0],
        r"got \[2, 32, 784\]": x.reshape(2, 32, 784),
        "numpy array or torch tensor": x.tolist(),
    }
    for message, bad in cases.items():
        with pytest.raises(InputError, match=message):
            runtime.predict(bad)
    with pytest.raises(InputError, match="unknown task 9"):
        runtime.predict(x, task=9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_are_rejected_unless_allowed(served, backend):
    runtime = open_bundle(served[1], backend=backend)
    x = golden(served[1])["inputs"].copy()
    x[3, 100] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(InputError, match="NaN or infinite values in 2 row"):
        runtime.predict(x)
    out = runtime.predict(x, allow_nonfinite=True)
    assert np.isnan(out.logits[3]).all() and np.isfinite(np.delete(out.logits, [3, 7], 0)).all()


def test_tampered_missing_and_corrupted_files_are_refused(copy):
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes()[:-10])
    with pytest.raises(BundleError, match="model.onnx fails its sha256 check"):
        open_bundle(copy, backend="torchscript")  # every file is checked, not only the one used
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        open_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        open_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(copy)


def test_tampered_golden_logits_fail_the_check_even_when_resigned(copy):
    logits = np.load(copy / "golden_logits.npy")
    logits[5, 2] += 1e-3  # a small change: an uncaught one would mean the check proves nothing
    np.save(copy / "golden_logits.npy", logits)
    with pytest.raises(BundleError, match="golden_logits.npy fails its sha256 check"):
        open_bundle(copy)
    rewrite_manifest(copy, lambda m: m["files"]["golden_logits.npy"].update(
        sha256=sha256_file(copy / "golden_logits.npy")))
    for backend in BACKENDS:
        report = open_bundle(copy, backend=backend).check()
        assert not report["ok"] and report["max_abs_error"] > 5e-4


def test_unknown_format_version_and_foreign_manifests_are_refused(copy):
    rewrite_manifest(copy, lambda m: m.update(format_version=2))
    with pytest.raises(BundleError, match="format version 2; this dhp-deploy reads version 1"):
        open_bundle(copy)
    rewrite_manifest(copy, lambda m: m.update(format_version=1, format="something-else"))
    with pytest.raises(BundleError, match="not a dhp-deploy-bundle manifest"):
        read_manifest(copy)
    rewrite_manifest(copy, lambda m: m.update(format="dhp-deploy-bundle",
                                              files={"../model.ts": {"sha256": "0" * 64}}))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_manifest(copy)


def test_a_missing_artifact_and_a_missing_bundle_are_refused(copy, tmp_path):
    rewrite_manifest(copy, lambda m: m["artifacts"].pop("onnx"))
    with pytest.raises(BundleError, match="has no onnx artifact"):
        open_bundle(copy, backend="onnx")
    with pytest.raises(BundleError, match="no bundle directory"):
        open_bundle(tmp_path / "nowhere")


def test_unknown_backend_and_device_are_refused(served):
    with pytest.raises(BundleError, match="unknown backend 'tensorrt'"):
        open_bundle(served[1], backend="tensorrt")
    with pytest.raises(BundleError, match="unknown device 'tpu'"):
        open_bundle(served[1], device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_fails_clearly(served):
    with pytest.raises(BundleError, match="cuda requested but torch.cuda.is_available"):
        open_bundle(served[1], backend="torchscript", device="cuda")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BundleError, match="no CUDAExecutionProvider"):
            open_bundle(served[1], backend="onnx", device="cuda")


def test_onnxruntime_cpu_fallback_is_refused(served, monkeypatch):
    r"""onnxruntime-gpu whose CUDA cannot start quietly runs on CPU: we must refuse, not serve."""
    import onnxruntime as ort

    real_session = ort.InferenceSession

    class FallenBack(real_session):
        def __init__(self, path, sess_options=None, providers=None, **kwargs):
            assert providers == ["CUDAExecutionProvider"]  # CPU never offered as a fallback
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallenBack)
    with pytest.raises(BundleError, match=r"onnxruntime runs on \['CPUExecutionProvider'\].*"
                                          r"no silent CPU fallback"):
        open_bundle(served[1], backend="onnx", device="cuda")


# ----------------------------------------------------------------------------- GPU (marked)


def _eager_cpu(run, x):
    model, _ = load_model(run)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torchscript_on_cuda_matches_eager_cpu(served):
    run, bundle = served
    runtime = open_bundle(bundle, backend="torchscript", device="cuda")
    report = runtime.check()
    assert report["ok"], report
    x = np.ascontiguousarray(np.resize(golden(bundle)["inputs"], (4096, 784)))
    np.testing.assert_allclose(runtime.logits(x), _eager_cpu(run, x), rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_matches_eager_cpu(served):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    run, bundle = served
    runtime = open_bundle(bundle, backend="onnx", device="cuda")
    assert runtime.check()["ok"]
    x = np.ascontiguousarray(np.resize(golden(bundle)["inputs"], (4096, 784)))
    np.testing.assert_allclose(runtime.logits(x), _eager_cpu(run, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad, message", [
    ([[0.0] * 4], "numpy array or torch tensor, got list"),
    (np.zeros((2, 4), np.float64), "dtype must be float32, got float64"),
    (np.zeros((2, 5), np.float32), r"shape must be \[N, 4\] with N >= 1, got \[2, 5\]"),
    (np.zeros((0, 4), np.float32), r"got \[0, 4\]"),
    (np.zeros(4, np.float32), r"got \[4\]"),
    (np.array([[0, 1, np.nan, 0], [0, 0, 0, 0], [np.inf, 0, 0, 0]], np.float32),
     "NaN or infinite values in 2 row"),
])
def test_input_checks_give_one_line_errors(bad, message):
    # The runtime's input contract on synthetic arrays (no bundle, no MNIST needed).
    with pytest.raises(InputError, match=message) as caught:
        check_input(bad, 4)
    assert "\n" not in str(caught.value)


def test_input_check_accepts_tensors_and_opt_in_nonfinite_rows():
    x = torch.rand(3, 4)
    np.testing.assert_array_equal(check_input(x, 4), x.numpy())
    strided = np.zeros((3, 8), np.float32)[:, ::2]
    assert check_input(strided, 4).flags["C_CONTIGUOUS"]
    nan = np.full((1, 4), np.nan, np.float32)
    assert np.isnan(check_input(nan, 4, allow_nonfinite=True)).all()


def test_runtimes_default_to_one_intra_op_thread_and_take_another(served):
    # Latency serving: all-core defaults made the batch-1 p99 jump on a shared host. onnxruntime
    # takes threads per session; torch has one intra-op pool per process.
    from dhp_deploy.runtime import ort_session

    onnx = served[1] / "model.onnx"
    assert ort_session(onnx, "cpu").get_session_options().intra_op_num_threads == 1
    assert ort_session(onnx, "cpu", threads=2).get_session_options().intra_op_num_threads == 2
    assert ort_session(onnx, "cpu", threads=None).get_session_options().intra_op_num_threads == 0
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        open_bundle(served[1], backend="torchscript", threads=None)
        assert torch.get_num_threads() == 2  # None: torch's setting left alone
        open_bundle(served[1], backend="pt2")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(BundleError, match="threads must be >= 1"):
        open_bundle(served[1], threads=0)


def test_every_format_is_declared_once_and_complete():
    r"""A format of bundle.FORMATS has its file name, its writer (export) and its loader (serve),
    and the command lines offer exactly these formats: adding one is those three entries."""
    from dhp_deploy.bundle import ARTIFACT_FILES, FORMATS
    from dhp_deploy.cli.export import main as export_command
    from dhp_deploy.cli.serve import BACKEND_CHOICES
    from dhp_deploy.formats import WRITERS
    from dhp_deploy.runtime import LOADERS

    assert list(WRITERS) == list(LOADERS) == list(ARTIFACT_FILES) == list(FORMATS)
    assert len(set(ARTIFACT_FILES.values())) == len(FORMATS), "one file name per format"
    option = next(p for p in export_command.params if p.name == "fmt")
    assert list(option.type.choices) == [*FORMATS, "all", "triton"]
    assert list(BACKEND_CHOICES) == [*FORMATS, "all"]


def test_every_bundle_kind_is_declared_once_on_each_side(served):
    r"""A kind of bundle.BUNDLE_KINDS has its export side (bundle_kinds.KINDS: model, goldens,
    manifest entries) and its session (sessions.SESSIONS); open_session picks it by manifest."""
    from dhp_deploy.bundle import BUNDLE_KINDS, bundle_kind, read_manifest
    from dhp_deploy.bundle_kinds import KINDS
    from dhp_deploy.runtime import Runtime
    from dhp_deploy.sessions import SESSIONS, open_session

    assert list(KINDS) == list(SESSIONS) == list(BUNDLE_KINDS)
    bundle = served[1]
    assert bundle_kind(read_manifest(bundle)) == "frozen"
    assert isinstance(open_session(bundle, backend="onnx"), Runtime)
