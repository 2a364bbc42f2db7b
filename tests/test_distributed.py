r"""Data-parallel dhp-train under real torchrun processes (gloo, CPU) against one-process runs.

Split MNIST, DHP head. The equivalence run uses EWC (its Fisher is computed on shards and
all-reduced) and 1985 examples per task: the last global batch has one row, so rank 1's slice is
empty there and it must still join every collective.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun command of this torch
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="needs torch.distributed")
EWC_RUN = ["--benchmark", "split-mnist", "--method", "ewc", "--num-tasks", "2", "--epochs", "2",
           "--train-limit", "1985", "--test-limit", "500", "--fisher-samples", "201",
           "--threads", "1", "--quiet"]
FIRST_TASK = ["--benchmark", "split-mnist", "--method", "finetune", "--num-tasks", "1",
              "--epochs", "1", "--train-limit", "1984", "--test-limit", "100", "--threads", "1",
              "--quiet"]
STEPS_PER_TASK = 2 * 32  # 2 epochs of ceil(1985 / 64) global batches


def _env(data_dir, **extra) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "DHP_TRAIN_FAULT"}
    env.update(OMP_NUM_THREADS="1", DHP_DATA_DIR=str(data_dir), **extra)
    return env


def torchrun(data_dir, *args, nproc: int = 2, timeout: float = 300):
    r"""``torchrun --standalone --nproc-per-node nproc ARGS`` as a real subprocess."""
    return subprocess.run([*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *map(str, args)],
                          capture_output=True, text=True, env=_env(data_dir), timeout=timeout)


def train_2_ranks(data_dir, *args):
    result = torchrun(data_dir, "-m", "dhp_deploy.cli.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoint(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def metrics(run_dir) -> dict:
    import json

    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ewc_runs(tmp_path_factory, data_dir):
    r"""The EWC run in one process and on two gloo ranks."""
    root = tmp_path_factory.mktemp("ddp")
    one = run_cli("train", *EWC_RUN, "--out", root / "one", env={"DHP_DATA_DIR": str(data_dir)})
    assert one.returncode == 0, one.stderr
    train_2_ranks(data_dir, *EWC_RUN, "--out", root / "two")
    return root / "one", root / "two"


def test_two_ranks_train_the_one_process_model(ewc_runs):
    one, two = ewc_runs
    single, double = checkpoint(one)["model"], checkpoint(two)["model"]
    assert single.keys() == double.keys()
    for name in single:  # trace, θ, α, η and the trunk: equal up to fp32 summation order
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
    a, b = torch.tensor(metrics(one)["acc_matrix"]), torch.tensor(metrics(two)["acc_matrix"])
    assert (a - b).abs().max() <= 0.002  # within 0.2 pp
    ewc_one, ewc_two = checkpoint(one)["regularizer"], checkpoint(two)["regularizer"]
    torch.testing.assert_close(ewc_two["importances"][0], ewc_one["importances"][0],
                               rtol=1e-4, atol=1e-9)  # the Fisher of sharded samples


def test_rank_0_alone_writes_and_records_the_world_size(ewc_runs):
    one, two = ewc_runs
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    config = metrics(two)["config"]
    assert (config["world_size"], config["backend"]) == (2, "gloo")
    assert metrics(one)["config"]["world_size"] == 1


def test_the_synchronised_trace_is_what_makes_ranks_agree(tmp_path, data_dir):
    # Plain DDP (buffer broadcast, each rank its own Hebbian update) on the same batches gives a
    # trace unlike the one-process run's; dhp-train on two ranks gives that run's trace.
    one = run_cli("train", *FIRST_TASK, "--out", tmp_path / "one",
                  env={"DHP_DATA_DIR": str(data_dir)})
    assert one.returncode == 0, one.stderr
    train_2_ranks(data_dir, *FIRST_TASK, "--out", tmp_path / "two")
    naive = torchrun(data_dir, Path(__file__).parent / "naive_ddp.py", tmp_path / "naive.pt",
                     data_dir, 1984)
    assert naive.returncode == 0, naive.stderr[-3000:]
    reference = checkpoint(tmp_path / "one")["model"]["head.hebb"]
    synced = checkpoint(tmp_path / "two")["model"]["head.hebb"]
    broadcast = torch.load(tmp_path / "naive.pt", weights_only=True)
    synced_error = (synced - reference).abs().max().item()
    naive_error = (broadcast - reference).abs().max().item()
    assert synced_error < 1e-6
    assert naive_error > 1e-3 and naive_error > 1000 * synced_error, (naive_error, synced_error)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_ranks(command: list, base: dict, extra_env: dict) -> list:
    r"""Ranks 0 and 1 started by hand (as a scheduler would), each with ``extra_env[rank]``;
    their CompletedProcess results once both have exited (killed after 240 s)."""
    ranks = [subprocess.Popen(command, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                            **extra_env.get(rank, {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=240) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    return [subprocess.CompletedProcess(command, rank.returncode, *output)
            for rank, output in zip(ranks, outputs)]


def test_a_dead_rank_stops_the_other_and_resume_finishes_the_run(ewc_runs, tmp_path, data_dir):
    # Launched as a cluster scheduler would (the torchrun variables set by hand), so the survivor's
    # own behaviour shows: rank 1 is SIGKILLed in the middle of task 2.
    run_dir = tmp_path / "killed"
    base = _env(data_dir, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    command = [sys.executable, "-m", "dhp_deploy.cli.train", *EWC_RUN, "--dist-timeout", "60",
               "--out", str(run_dir)]
    started = time.monotonic()
    fault = {"DHP_TRAIN_FAULT": f"sigkill-after-steps={STEPS_PER_TASK + 40}"}
    results = _two_ranks(command, base, {1: fault})
    assert results[1].returncode == -signal.SIGKILL
    survivor = results[0]
    assert_one_line_error(survivor, "rank 0 of 2: lost the other ranks", "--resume", exit_code=1)
    assert time.monotonic() - started < 120  # the survivor did not wait for the timeout
    assert checkpoint(run_dir)["position"] == {"task": 1, "epoch": 0, "finished": False}
    assert not (run_dir / "metrics.json").exists()

    train_2_ranks(data_dir, "--resume", run_dir, "--quiet")
    uninterrupted = ewc_runs[1]
    assert metrics(run_dir)["acc_matrix"] == metrics(uninterrupted)["acc_matrix"]
    resumed, reference = checkpoint(run_dir)["model"], checkpoint(uninterrupted)["model"]
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


@pytest.mark.parametrize("failing", [1, 0], ids=["rank 1 fails", "rank 0 (store host) fails"])
def test_a_rank_failing_alone_stops_every_rank_within_seconds(tmp_path, data_dir, failing):
    # Launched by hand as a scheduler would; the failing rank's data root is empty, so it stops
    # while loading the data and its peer learns why at its first collective. The default
    # --dist-timeout (300 s) stays in force: the bound below is far under it.
    base = _env(data_dir, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    command = [sys.executable, "-m", "dhp_deploy.cli.train", *FIRST_TASK, "--out",
               str(tmp_path / "run")]
    started = time.monotonic()
    results = _two_ranks(command, base, {failing: {"DHP_DATA_DIR": str(tmp_path / "no-data")}})
    elapsed = time.monotonic() - started
    assert_one_line_error(results[failing], "missing", "MNIST", exit_code=1)
    peer = 1 - failing
    assert_one_line_error(results[peer], f"rank {peer} of 2", f"rank {failing}: missing",
                          "MNIST", exit_code=1)
    assert elapsed < 60, elapsed
    print(f"rank {failing} failing alone: both ranks exited after {elapsed:.1f} s")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_ranks_train_the_cpu_model(tmp_path, data_dir):
    # One rank per GPU (all of them, at most 2) under torchrun with NCCL, against one CPU process.
    ranks = min(torch.cuda.device_count(), 2)
    one = run_cli("train", *FIRST_TASK, "--device", "cpu", "--out", tmp_path / "cpu",
                  env={"DHP_DATA_DIR": str(data_dir)})
    assert one.returncode == 0, one.stderr
    result = torchrun(data_dir, "-m", "dhp_deploy.cli.train", *FIRST_TASK, "--device", "cuda",
                      "--out", tmp_path / "nccl", nproc=ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    config = metrics(tmp_path / "nccl")["config"]
    assert (config["world_size"], config["backend"]) == (ranks, "nccl")
    cpu, gpu = checkpoint(tmp_path / "cpu")["model"], checkpoint(tmp_path / "nccl")["model"]
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-3, atol=1e-5, msg=name)
    print(f"{ranks} NCCL rank(s) vs CPU: max trace difference "
          f"{(gpu['head.hebb'].cpu() - cpu['head.hebb']).abs().max().item():.3g}")
