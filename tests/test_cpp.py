"""serve/cpp: build dhp_check against the pip torch with CMake and prove parity from C++."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dhp_deploy.run_dir import load_model
from dhp_deploy.export import ATOL, benchmark_of_run

TOOLS = {"cmake": shutil.which("cmake"), "c++": shutil.which("c++") or shutil.which("g++")}
pytestmark = pytest.mark.skipif(not all(TOOLS.values()), reason="needs cmake and a C++ compiler: "
                                f"missing {[k for k, v in TOOLS.items() if not v]}")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dhp_check(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    prefix = torch.utils.cmake_prefix_path
    for command in (["cmake", "-S", REPO / "serve" / "cpp", "-B", build,
                     "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}"],
                    ["cmake", "--build", build, "-j", "2"]):
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command[:2]} failed:\n{result.stdout}\n{result.stderr}"
    return build / "dhp_check"


def run(binary, *args):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def fields(stdout):
    return dict(re.findall(r"(\w+)=(\S+)", stdout))


def test_cpp_matches_eager_on_the_goldens(dhp_check, served):
    result = run(dhp_check, served[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"libtorch {torch.__version__.split('+')[0]}/cpu:")
    values = fields(result.stdout)
    assert float(values["max_abs_error"]) <= ATOL and values["argmax_agree"] == "64/64"
    assert result.stdout.rstrip().endswith("OK")


def test_cpp_matches_eager_on_the_full_test_set(dhp_check, served, tmp_path, data_dir):
    run_dir, bundle = served
    model, payload = load_model(run_dir)
    x = torch.cat([t.x_test for t in benchmark_of_run(payload, data_dir).tasks])
    with torch.no_grad():
        eager = model(x)  # the unfolded eager model, as the goldens
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", eager.numpy())
    result = run(dhp_check, bundle, "--inputs", tmp_path / "x.npy", "--logits", tmp_path / "y.npy")
    assert result.returncode == 0, result.stdout + result.stderr
    values = fields(result.stdout)
    assert values["argmax_agree"] == f"{len(x)}/{len(x)}" and float(values["max_abs_error"]) <= ATOL
    assert values["batches"] == f"[{len(x)},"


def test_cpp_fails_on_a_parity_error(dhp_check, served, tmp_path):
    bundle = shutil.copytree(served[1], tmp_path / "bundle")
    logits = np.load(bundle / "golden_logits.npy")
    logits[10, 4] += 1e-3
    np.save(bundle / "golden_logits.npy", logits)
    result = run(dhp_check, bundle)
    assert result.returncode == 1 and result.stdout.rstrip().endswith("FAIL")
    assert float(fields(result.stdout)["max_abs_error"]) > 5e-4


def test_cpp_errors_are_one_line_with_exit_2(dhp_check, served, tmp_path):
    usage = run(dhp_check)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: dhp_check BUNDLE_DIR")
    missing = run(dhp_check, tmp_path / "nowhere")
    assert missing.returncode == 2 and "cannot open" in missing.stderr
    bundle = shutil.copytree(served[1], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}, indent=2))
    version = run(dhp_check, bundle)
    assert version.returncode == 2 and "format version is not 1" in version.stderr
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (bundle / "model.ts").write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line(run(dhp_check, bundle), "model.ts is damaged or unreadable")
    pt2 = (served[1] / "model.pt2").read_bytes()
    (bundle / "model.pt2").write_bytes(pt2[:len(pt2) // 2])
    assert_one_line(run(dhp_check, bundle, "--backend", "pt2"), "model.pt2 is damaged or unreadable")
    shutil.copy(served[1] / "model.ts", bundle / "model.ts")
    (bundle / "golden_inputs.npy").write_bytes(b"\x93NUMPY\x09\x00 garbage")
    npy = run(dhp_check, bundle)
    assert npy.returncode == 2 and "golden_inputs.npy: unsupported .npy version" in npy.stderr
    if not torch.cuda.is_available():
        cuda = run(dhp_check, served[1], "--device", "cuda")
        assert cuda.returncode == 2 and "no CUDA device" in cuda.stderr


def assert_one_line(result, phrase, exit_code=2):
    r"""Failed with ``exit_code`` and one stderr line holding ``phrase``, nothing on stdout."""
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and phrase in result.stderr, result.stderr
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize("backend", ["torchscript", "pt2"])
def test_cpp_validates_inputs_against_the_manifest_before_running(dhp_check, served, tmp_path,
                                                                  backend):
    # Before, a wrong width was a 39-line TorchScript traceback (a C++ backtrace with .pt2), a
    # NaN a parity FAIL, an empty file torch.cat's "expected a non-empty list of Tensors".
    bundle = served[1]
    x, y = np.load(bundle / "golden_inputs.npy"), np.load(bundle / "golden_logits.npy")
    nan = x.copy()
    nan[3, 5] = np.nan
    arrays = {"narrow.npy": x[:, :783], "nan.npy": nan, "empty.npy": x[:0], "y0.npy": y[:0],
              "y.npy": y, "y9.npy": y[:, :9], "short.npy": y[:10]}
    for name, array in arrays.items():
        np.save(tmp_path / name, array)
    cases = [("narrow.npy", "y.npy", "narrow.npy has shape [64, 783]; the model takes float32 "
                                     "[N, 784]"),
             ("nan.npy", "y.npy", "nan.npy has NaN or infinite values in 1 row(s)"),
             ("empty.npy", "y0.npy", "empty.npy has no rows"),
             (bundle / "golden_inputs.npy", "y9.npy", "the model returns float32 [N, 10]"),
             (bundle / "golden_inputs.npy", "short.npy", "has 64 rows but")]
    for inputs, logits, phrase in cases:
        assert_one_line(run(dhp_check, bundle, "--backend", backend, "--inputs",
                            tmp_path / inputs, "--logits", tmp_path / logits), phrase)


def test_cpp_usage_errors_and_help(dhp_check, served, tmp_path):
    bundle = served[1]
    np.save(tmp_path / "x.npy", np.load(bundle / "golden_inputs.npy"))
    for args, phrase in [(["--inputs", tmp_path / "x.npy"], "--inputs and --logits go together"),
                         (["--logits", tmp_path / "x.npy"], "--inputs and --logits go together"),
                         (["--atol", "abc"], "--atol must be a finite number >= 0, got 'abc'"),
                         (["--atol", "-1"], "got '-1'"), (["--rtol", "inf"], "got 'inf'"),
                         (["--rtol", "1e-4x"], "got '1e-4x'"), (["--atol"], "--atol needs a value"),
                         (["--frobnicate", "1"], "unknown argument '--frobnicate'")]:
        assert_one_line(run(dhp_check, bundle, *args), phrase)
    assert_one_line(run(dhp_check, "--device", "cpu"), "the first argument must be BUNDLE_DIR")
    for args in (["--help"], [bundle, "-h"]):
        shown = run(dhp_check, *args)
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        assert shown.stdout.startswith("usage: dhp_check BUNDLE_DIR [--backend torchscript|pt2]")
    exact = run(dhp_check, bundle, "--atol", "0.5", "--rtol", "0")
    assert exact.returncode == 0 and "atol=0.5 rtol=0 OK" in exact.stdout, exact.stderr


def test_cpp_pt2_loader_matches_eager_on_the_goldens(dhp_check, served):
    result = run(dhp_check, served[1], "--backend", "pt2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"aoti {torch.__version__.split('+')[0]}/cpu:")
    assert result.stdout.rstrip().endswith("OK")


@pytest.fixture(scope="module")
def plastic_bundle(served, tmp_path_factory, data_dir):
    from dhp_deploy.export import export_run

    bundle = tmp_path_factory.mktemp("cpp-plastic") / "bundle"
    return export_run(served[0], bundle, ("torchscript", "pt2"), data_dir=data_dir, plastic=True)


@pytest.mark.parametrize("backend", ["torchscript", "pt2"])
def test_cpp_replays_the_plastic_golden_stream(dhp_check, plastic_bundle, backend):
    # Every call's logits and returned trace from C++, fed back call after call; the .pt2
    # returns its trace column-major and reads inputs as row-major, which the loader handles.
    bundle = plastic_bundle
    result = run(dhp_check, bundle, "--backend", backend)
    assert result.returncode == 0, result.stdout + result.stderr
    values = fields(result.stdout)
    assert "(plastic): 23 calls" in result.stdout and values["argmax_agree"] == "64/64"
    assert float(values["max_trace_error"]) <= 1e-5 and result.stdout.rstrip().endswith("OK")


def test_cpp_refuses_inputs_and_logits_on_a_plastic_bundle(dhp_check, plastic_bundle, tmp_path):
    # They used to be ignored without a word (exit 0, even with a 783-wide file).
    np.save(tmp_path / "x.npy", np.zeros((4, 783), np.float32))
    np.save(tmp_path / "y.npy", np.zeros((4, 10), np.float32))
    assert_one_line(run(dhp_check, plastic_bundle, "--inputs", tmp_path / "x.npy", "--logits",
                        tmp_path / "y.npy"), "is a plastic bundle")
