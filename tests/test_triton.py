"""``dhp-serve check REPO`` on a Triton model repository, and ``--triton-sequences``.

One repository is exported from the session's ``served`` run by the real ``dhp-export`` command
(3 concurrent sequences, CPU instances). The intact copy passes ``dhp-serve check``; each broken
copy fails it with one ``Error:`` line naming the part (run in-process with click's runner: a
subprocess per case would cost a Python and torch start-up each on a 2-core CI host).
"""

import json
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
