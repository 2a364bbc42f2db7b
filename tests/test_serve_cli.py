"""dhp-serve as a user runs it: real subprocesses, exit codes, one-line errors, no tracebacks."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from dhp_deploy.export import ATOL, sha256_file
from dhp_deploy.runtime import open_bundle
from cli_helpers import assert_one_line_error, run_cli


@pytest.fixture
def copy(served, tmp_path):
    return shutil.copytree(served[1], tmp_path / "bundle")


def serve(*args):
    return run_cli("serve", *args)


def test_check_reports_errors_and_agreement_per_backend(served):
    result = serve("check", served[1])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["torchscript/cpu", "onnx/cpu", "pt2/cpu"]
    for line in lines:
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert float(fields["max_abs_error"]) <= ATOL and "max_rel_error" in fields
        assert fields["argmax_agree"] == "64/64" and fields["task_head_agree"] == "64/64"
        assert line.endswith(" OK")
    only = serve("check", served[1], "--backend", "onnx")
    assert only.returncode == 0 and only.stdout.startswith("onnx/cpu")


def test_check_fails_on_a_parity_error(copy):
    logits = np.load(copy / "golden_logits.npy")
    logits[0, logits[0].argmin()] += 0.01  # the row's smallest logit: its argmax stays put
    np.save(copy / "golden_logits.npy", logits)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["golden_logits.npy"]["sha256"] = sha256_file(copy / "golden_logits.npy")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = serve("check", copy)
    assert result.returncode == 1 and result.stdout.count(" FAIL") == 3
    assert_one_line_error(result, "parity check failed for torchscript, onnx, pt2")
    loose = serve("check", copy, "--atol", "0.02")  # the stated tolerance is what decides
    assert loose.returncode == 0, loose.stdout + loose.stderr


def test_predict_writes_logits_classes_and_labels(served, tmp_path):
    bundle = served[1]
    x = np.load(bundle / "golden_inputs.npy")
    np.save(tmp_path / "x.npy", x)
    expected = open_bundle(bundle, backend="onnx").predict(x, task=3)
    out = tmp_path / "out.npz"
    result = serve("predict", bundle, "--input", tmp_path / "x.npy", "--output", out,
                   "--task", 3, "--backend", "onnx")
    assert result.returncode == 0, result.stderr
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["logits"], expected.logits)
        assert saved["classes"].tolist() == [6, 7]
        np.testing.assert_array_equal(saved["labels"], expected.labels)
    result = serve("predict", bundle, "--input", tmp_path / "x.npy", "--output", out,
                   "--all-classes")
    assert result.returncode == 0, result.stderr
    with np.load(out) as saved:
        assert saved["logits"].shape == (64, 10) and saved["classes"].tolist() == list(range(10))
    result = serve("predict", bundle, "--input", tmp_path / "x.npy", "--output",
                   tmp_path / "logits.npy", "--task", 3, "--backend", "onnx")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected.logits)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["logits.npy", "out.npz", "x.npy"], "no temporary files left"


def test_predict_on_a_task_incremental_bundle_needs_a_task_or_all_classes(served, tmp_path):
    # Split MNIST's heads were trained one task at a time: an argmax over all ten classes
    # compares heads that never competed (36.5% accurate on the demo against 97.1% per task).
    bundle = served[1]
    np.save(tmp_path / "x.npy", np.load(bundle / "golden_inputs.npy"))
    out = tmp_path / "out.npz"
    silent = serve("predict", bundle, "--input", tmp_path / "x.npy", "--output", out)
    assert_one_line_error(silent, "task-incremental", "--task T (one of 0, 1, 2, 3, 4)",
                          "--all-classes", exit_code=2)
    both = serve("predict", bundle, "--input", tmp_path / "x.npy", "--output", out,
                 "--task", 1, "--all-classes")
    assert_one_line_error(both, "--task and --all-classes exclude each other", exit_code=2)
    assert not out.exists()


def test_bench_prints_latency_and_throughput(served):
    result = serve("bench", served[1], "--iters", 20, "--batch-size", 512, "--repeats", 2)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, backend in zip(lines, ("torchscript", "onnx", "pt2")):
        assert re.match(rf"{backend}/cpu: batch 1 p50=[\d.]+ ms p99=[\d.]+ ms; batch 512 "
                        r"[\d,]+ samples/s = [\d.]+ GFLOP/s \(1 thread\)$", line), line


def test_bench_with_a_batch_no_host_holds_is_a_one_line_error(served):
    result = serve("bench", served[1], "--backend", "onnx", "--iters", 10, "--repeats", 1,
                   "--batch-size", 10 ** 12)
    assert_one_line_error(result, "--batch-size 1000000000000", "more than this host could "
                          "allocate")


def _bad_input(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_predict_rejects_bad_inputs_with_one_line(served, tmp_path):
    bundle = served[1]
    x = np.load(bundle / "golden_inputs.npy")
    nan = x.copy()
    nan[1, 1] = np.nan
    out = tmp_path / "out.npz"
    cases = [
        (_bad_input(tmp_path, "shape.npy", x[:, :700]), [], "shape must be [N, 784]"),
        (_bad_input(tmp_path, "dtype.npy", x.astype(np.float64)), [], "float32, got float64"),
        (_bad_input(tmp_path, "nan.npy", nan), [], "NaN or infinite"),
        (_bad_input(tmp_path, "task.npy", x), ["--task", "5"], "unknown task 5"),
    ]
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an npy file")  # numpy alone blames "pickled (object) data"
    cases.append((garbage, [], "is not a .npy array file"))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes((tmp_path / "shape.npy").read_bytes()[:200])
    cases.append((truncated, [], "is not a readable .npy array"))
    for path, extra, phrase in cases:
        assert_one_line_error(serve("predict", bundle, "--input", path, "--output", out,
                                    *(extra or ["--task", 0])), phrase)
    assert not out.exists()
    (tmp_path / "file").write_text("")
    parent_is_file = serve("predict", bundle, "--input", tmp_path / "nan.npy", "--output",
                           tmp_path / "file" / "sub" / "out.npz", "--task", 0)
    assert_one_line_error(parent_is_file, f"{tmp_path / 'file'} is a file, not a directory",
                          exit_code=2)
    allowed = serve("predict", bundle, "--input", tmp_path / "nan.npy", "--output", out,
                    "--allow-nonfinite", "--all-classes")
    assert allowed.returncode == 0 and out.exists()


def test_damaged_bundles_fail_with_one_line(copy, tmp_path):
    ts = copy / "model.ts"
    ts.write_bytes(ts.read_bytes()[:1000])
    assert_one_line_error(serve("check", copy), "model.ts fails its sha256 check")
    ts.unlink()
    assert_one_line_error(serve("check", copy), "model.ts is missing")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(serve("check", copy), "format version 99")
    assert_one_line_error(serve("check", tmp_path / "nowhere"), "does not exist")


def test_a_truncated_pt2_is_named_damaged_in_one_line(copy):
    # With a checksum that matches the damage: torch's loader logged "Loading outdated pt2
    # file..." before its own error.
    pt2 = copy / "model.pt2"
    pt2.write_bytes(pt2.read_bytes()[:50_000])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.pt2"] = {"sha256": sha256_file(pt2), "bytes": pt2.stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = serve("check", copy, "--backend", "pt2")
    assert_one_line_error(result, "model.pt2 is damaged or unreadable")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unknown_backend_or_device_and_cuda_without_gpu(served):
    bundle = served[1]
    assert_one_line_error(serve("check", bundle, "--backend", "tensorrt"), "tensorrt")
    assert_one_line_error(serve("check", bundle, "--device", "tpu"), "tpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(serve("check", bundle, "--device", "cuda"), "cuda requested")
    assert_one_line_error(serve("check", bundle, "--backend", "onnx", "--device", "cuda"),
                    "cuda requested")
