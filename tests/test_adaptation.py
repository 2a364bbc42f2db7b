r"""benchmarks/adaptation.py on a tiny real Permuted MNIST run: a plastic bundle served by
PlasticSession, predict-then-learn streams against the frozen reference."""

import json
import sys
from pathlib import Path

import pytest

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import adaptation  # noqa: E402


@pytest.fixture(scope="module")
def permuted_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("adapt") / "run"
    result = run_cli("train", "--benchmark", "permuted-mnist", "--num-tasks", "2", "--epochs", "1",
                     "--train-limit", "600", "--test-limit", "200", "--hidden", "32", "--lr",
                     "0.05", "--out", run, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    return run


def test_adaptation_streams_through_the_plastic_bundle(permuted_run, data_dir, tmp_path):
    assert adaptation.main([str(permuted_run), "--out", str(tmp_path), "--data-dir",
                            str(data_dir), "--stream", "100", "--call", "10"]) == 0
    record = json.loads(next(tmp_path.rglob("seed0.json")).read_text())
    assert record["kind"] == "dhp-adaptation" and record["variant"] == "dhp~eta-bound"  # default
    assert set(record["streams"]) == {"last task", "first task", "new permutation"}
    metrics = json.loads((permuted_run / "metrics.json").read_text())
    unseen = record["streams"]["new permutation"]
    # The served plastic model with its exported trace scores the learned tasks as training did.
    assert unseen["learned_tasks_before"] == pytest.approx(metrics["acc_matrix"][-1], abs=0.011)
    for stream in record["streams"].values():
        assert 0.0 <= stream["frozen"] <= 1.0 and len(stream["plastic_curve"]) == 1
    # Learning moved the trace (the frozen pass before it did not: its scores equal training's).
    assert unseen["max_abs_hebb_after"] > 0


def test_adaptation_skips_what_is_not_a_finished_dhp_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert adaptation.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 0
    assert "not a finished DHP run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
