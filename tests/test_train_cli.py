"""dhp-train as a user runs it: real subprocesses, a real SIGKILL and resume, and bad input that
must end in a one-line error with a non-zero exit status, never a traceback."""

import json
import shutil
import signal

import pytest
import torch

from dhp_deploy.run_dir import load_checkpoint

from cli_helpers import assert_one_line_error, run_cli
from old_runs import as_version_1

# 256 examples in batches of 32: 8 steps per epoch; 2 tasks × 3 epochs = 48 steps.
QUICK = ["--benchmark", "split-mnist", "--num-tasks", "2", "--epochs", "3", "--hidden", "32",
         "--train-limit", "256", "--test-limit", "100", "--batch-size", "32", "--lr", "0.1",
         "--fisher-samples", "64", "--device", "cpu", "--threads", "1",
         # lr 0.1 (fast tiny runs) needs gentler penalties than the searched lr-0.01 defaults
         "--ewc-lambda", "100", "--si-c", "0.1", "--mas-lambda", "0.1"]


def dhp_train(*args, data_dir=None, extra_env=None):
    env = dict(extra_env or {})
    if data_dir is not None:
        env["DHP_DATA_DIR"] = str(data_dir)
    return run_cli("train", *args, env=env, timeout=300)


def assert_same_run(left, right):
    left_payload, right_payload = load_checkpoint(left), load_checkpoint(right)
    for name, tensor in left_payload["model"].items():  # every weight, the trace included
        assert torch.equal(tensor, right_payload["model"][name]), name
    left_metrics = json.loads((left / "metrics.json").read_text())
    right_metrics = json.loads((right / "metrics.json").read_text())
    assert left_metrics["acc_matrix"] == right_metrics["acc_matrix"]
    assert left_metrics["config"] == right_metrics["config"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = dhp_train(*QUICK, "--method", "si", "--momentum", "0.9", "--out", run_dir,
                       data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_a_run_writes_its_files_progress_and_summary(finished_run):
    run_dir, result = finished_run
    for name in ("config.json", "checkpoint.pt", "metrics.json", "metrics.csv", "accuracy.png"):
        assert (run_dir / name).is_file(), name
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("task ")]
    assert len(epoch_lines) == 6 and all("loss" in l and "ETA" in l for l in epoch_lines)
    assert "ACC" in result.stdout and "BWT" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"acc_matrix", "avg_acc", "acc", "bwt", "forgetting", "config", "timings"} <= set(metrics)
    assert metrics["config"]["training"]["hidden"] == [32]
    assert metrics["config"]["training"]["train_limit"] == 256


def test_sigkill_mid_task_then_resume_is_bit_identical(finished_run, tmp_path, data_dir):
    straight, _ = finished_run
    cut = tmp_path / "cut"
    # Step 36 is inside task 1, epoch 1: the latest checkpoint is after task 1 epoch 0.
    killed = dhp_train(*QUICK, "--method", "si", "--momentum", "0.9", "--out", cut,
                       data_dir=data_dir, extra_env={"DHP_TRAIN_FAULT": "sigkill-after-steps=36"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(cut)["position"] == {"task": 1, "epoch": 0, "finished": False}
    assert not (cut / "metrics.json").exists()

    resumed = dhp_train("--resume", cut, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_run(straight, cut)


def test_a_run_killed_under_checkpoint_version_1_resumes_and_exports(finished_run, tmp_path,
                                                                      data_dir):
    # Runs saved by an older release (config layout 1, checkpoint version 1) still resume, to the
    # same weights as a run never interrupted, and export.
    straight, _ = finished_run
    cut = tmp_path / "cut"
    killed = dhp_train(*QUICK, "--method", "si", "--momentum", "0.9", "--out", cut,
                       data_dir=data_dir, extra_env={"DHP_TRAIN_FAULT": "sigkill-after-steps=36"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    as_version_1(cut)
    assert "model" in json.loads((cut / "config.json").read_text())
    resumed = dhp_train("--resume", cut, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight, cut)
    # Rewritten in the current layout as it trained (the file itself, not the migrated load).
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["version"] == 2
    assert json.loads((cut / "config.json").read_text())["config_version"] == 2
    exported = run_cli("export", cut, "--format", "onnx", "--out", tmp_path / "bundle",
                       env={"DHP_DATA_DIR": str(data_dir)})
    assert exported.returncode == 0, exported.stderr


@pytest.mark.parametrize("field", ["checkpoint", "configuration"])
def test_a_run_from_a_newer_release_is_refused_in_one_line(finished_run, tmp_path, data_dir,
                                                           field):
    newer = tmp_path / "newer"
    shutil.copytree(finished_run[0], newer)
    payload = torch.load(newer / "checkpoint.pt", weights_only=True)
    if field == "checkpoint":
        payload["version"] = 3
    else:
        payload["config"]["config_version"] = 3
    torch.save(payload, newer / "checkpoint.pt")
    before = (newer / "checkpoint.pt").read_bytes()
    result = dhp_train("--resume", newer, data_dir=data_dir)
    assert_one_line_error(result, "cannot resume", "version 3")
    assert (newer / "checkpoint.pt").read_bytes() == before  # left as it was


def test_resume_after_a_kill_between_tasks_with_ewc(tmp_path, data_dir):
    runs = {}
    for name, fault in [("straight", None), ("cut", "sigkill-after-steps=24")]:
        runs[name] = tmp_path / name
        result = dhp_train(*QUICK, "--method", "ewc", "--no-dhp", "--out", runs[name],
                           data_dir=data_dir,
                           extra_env={"DHP_TRAIN_FAULT": fault} if fault else None)
        assert result.returncode == (-signal.SIGKILL if fault else 0), result.stderr
    assert dhp_train("--resume", runs["cut"], data_dir=data_dir).returncode == 0
    assert_same_run(runs["straight"], runs["cut"])


@pytest.mark.parametrize("option, value", [("--benchmark", "cifar-100"), ("--method", "l2")])
def test_unknown_benchmark_or_method_is_a_usage_error(option, value, tmp_path):
    args = {"--benchmark": "split-mnist", "--method": "finetune", option: value}
    result = dhp_train(*[x for pair in args.items() for x in pair], "--out", tmp_path / "r")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert value in result.stderr


def test_a_model_too_large_for_the_host_is_a_one_line_error(tmp_path, data_dir):
    # A billion-unit hidden layer (3 TB of weights): the allocator's error, in one line.
    result = dhp_train("--benchmark", "split-mnist", "--hidden", "1000000000", "--device", "cpu",
                       "--out", tmp_path / "r", data_dir=data_dir)
    assert_one_line_error(result, "out of memory", "a smaller --hidden or --batch-size fits")


def test_missing_data_is_a_one_line_error(tmp_path):
    result = dhp_train("--benchmark", "split-mnist", "--out", tmp_path / "r",
                       "--data-dir", tmp_path / "no-data")
    assert_one_line_error(result, "missing", exit_code=1)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [arg if arg != "0.1" else "1e6" for arg in QUICK]  # the learning rate
    result = dhp_train(*args, "--out", run_dir, data_dir=data_dir)
    assert_one_line_error(result, "diverged", exit_code=1)
    payload = load_checkpoint(run_dir)  # loadable, and every weight finite
    assert all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())
    assert not (run_dir / "metrics.json").exists()


def test_an_unwritable_output_directory_fails_before_training(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = dhp_train(*QUICK, "--out", blocker / "run", data_dir=data_dir)
    assert_one_line_error(result, "cannot write to the output directory", exit_code=1)
    assert "task 1/" not in result.stderr and "training " not in result.stderr


def test_a_corrupt_checkpoint_is_refused_on_resume(finished_run, tmp_path, data_dir):
    run_dir = tmp_path / "corrupt"
    run_dir.mkdir()
    good = (finished_run[0] / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    assert_one_line_error(dhp_train("--resume", run_dir, data_dir=data_dir), "cannot resume",
                          exit_code=1)
    (run_dir / "checkpoint.pt").write_bytes(b"junk" * 100)
    assert_one_line_error(dhp_train("--resume", run_dir, data_dir=data_dir), "cannot resume",
                          exit_code=1)


def test_a_finished_run_is_not_overwritten_without_overwrite(finished_run, tmp_path, data_dir):
    run_dir, _ = finished_run
    before = (run_dir / "checkpoint.pt").read_bytes()
    refused = dhp_train(*QUICK, "--out", run_dir, data_dir=data_dir)
    assert refused.returncode == 2 and "finished run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = dhp_train(*QUICK, "--out", other, data_dir=data_dir)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes(before)
    replaced = dhp_train(*QUICK, "--epochs", "1", "--quiet", "--out", copy, "--overwrite",
                         data_dir=data_dir)
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout == "" and replaced.stderr == ""
    assert load_checkpoint(copy)["config"]["training"]["epochs"] == 1


def test_resume_takes_no_training_options_and_needs_a_run_dir(finished_run, data_dir):
    run_dir, _ = finished_run
    result = dhp_train("--resume", run_dir, "--lr", "0.5", data_dir=data_dir)
    assert result.returncode == 2 and "--lr" in result.stderr
    assert dhp_train("--benchmark", "split-mnist").returncode == 2  # neither --out nor --resume
    again = dhp_train("--resume", run_dir, data_dir=data_dir)  # finished: metrics rewritten
    assert again.returncode == 0 and "already finished" in again.stderr


def test_a_strength_beyond_sgd_stability_stops_before_the_task(tmp_path, data_dir):
    stiff = tmp_path / "stiff"
    result = dhp_train(*QUICK, "--epochs", "1", "--method", "ewc", "--ewc-lambda", "1e9",
                       "--out", stiff, data_dir=data_dir)
    error = assert_one_line_error(result, "--ewc-lambda 1e+09 is too strong", "from task 2",
                                  "largest stable --ewc-lambda is", "is intact")
    payload = load_checkpoint(stiff)  # the finished task 1, not a step of task 2
    assert payload["position"] == {"task": 0, "epoch": 0, "finished": False}
    assert len(payload["metrics"]["acc_matrix"]) == 1
    largest = float(error.split("largest stable --ewc-lambda is ")[1].split(";")[0])
    # Task 1 trains without the penalty, so task 2 starts from the same curvature: just below
    # the bound the run finishes, finite.
    below = tmp_path / "below"
    result = dhp_train(*QUICK, "--epochs", "1", "--method", "ewc", "--ewc-lambda",
                       f"{0.9 * largest:g}", "--out", below, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((below / "metrics.json").read_text())
    assert all(0 <= v <= 1 for row in metrics["acc_matrix"] for v in row)
