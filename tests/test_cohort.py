"""Runs trained together as one vectorised model (dhp_deploy.cohort) on real MNIST: each equals
the same run trained alone, writes the same files, resumes, and leaves the cohort alone when it
fails."""

import pytest
import torch

from dhp_deploy.cohort import Cohort
from dhp_deploy.cuda_graph import GraphedStep
from dhp_deploy.run_dir import CHECKPOINT_NAME, load_checkpoint
from dhp_deploy.tasks import batches, build_benchmark
from dhp_deploy.steps import target_map
from dhp_deploy.train import (TrainConfig, TrainingError, TrainingRun, UnstableStrength,
                              start_or_resume)
from test_train import TINY, one_thread  # noqa: F401 (the fixture: one thread for this module)

# Two tasks of 3 epochs, so a cohort crosses a consolidation and a resume lands mid-task.
SMALL = {**TINY, "epochs": 3}


def started(configs, root, data_dir, device="cpu", names=None):
    names = names or [f"run{index}" for index in range(len(configs))]
    return [TrainingRun.start(config, build_benchmark(**config.data_arguments(),
                                                      data_dir=data_dir, device=device),
                              root / name, device) for config, name in zip(configs, names)]


def alone(config, root, data_dir):
    run = started([config], root, data_dir)[0]
    return run, run.run()


def assert_same_run(together, by_itself, metrics_together, metrics_alone):
    # Equal to float rounding: the batched matmuls sum in another order than the one-run ones.
    for name, tensor in by_itself.model.state_dict().items():
        torch.testing.assert_close(together.model.state_dict()[name], tensor, rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"{name}: {m}")
    for row_together, row_alone in zip(metrics_together["acc_matrix"], metrics_alone["acc_matrix"]):
        assert row_together == pytest.approx(row_alone, abs=0.011)  # ≤ one test image of 100
    assert len(metrics_together["acc_matrix"]) == len(metrics_alone["acc_matrix"])


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
def test_each_run_of_a_cohort_equals_the_run_trained_alone(dhp, tmp_path, data_dir):
    # Other seeds, other methods (each its own penalty and SI's path integral), one stack.
    configs = [TrainConfig(method=method, dhp=dhp, seed=seed, **SMALL)
               for seed, method in enumerate(("finetune", "ewc", "si", "mas", "online-ewc"))]
    runs = started(configs, tmp_path / "cohort", data_dir)
    outcomes = Cohort(runs).run()
    for config, run in zip(configs, runs):
        reference, metrics = alone(config, tmp_path / f"alone-{config.seed}", data_dir)
        assert_same_run(run, reference, outcomes[run], metrics)
        assert outcomes[run]["timings"]["cohort_runs"] == len(configs)
        # Its files are a run's files: the checkpoint holds its own weights, not the stack's.
        saved = load_checkpoint(run.run_dir / CHECKPOINT_NAME)
        assert saved["position"]["finished"]
        assert all(tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
                   for tensor in saved["model"].values())
        torch.testing.assert_close(saved["model"], run.model.state_dict())
        assert (run.run_dir / "metrics.json").exists()


def test_a_one_head_cohort_equals_its_runs_alone(tmp_path, data_dir):
    # Class-incremental: one head over all classes, no task head to select (head None).
    configs = [TrainConfig(method=method, seed=seed, class_incremental=True, **SMALL)
               for seed, method in ((0, "finetune"), (1, "si"))]
    runs = started(configs, tmp_path, data_dir)
    assert runs[0].heads[0] is None
    outcomes = Cohort(runs).run()
    for config, run in zip(configs, runs):
        reference, metrics = alone(config, tmp_path / f"alone-{config.seed}", data_dir)
        assert_same_run(run, reference, outcomes[run], metrics)


def test_a_cohort_resumes_from_its_runs_checkpoints(tmp_path, data_dir):
    configs = [TrainConfig(method=method, seed=seed, **SMALL)
               for seed, method in ((0, "si"), (1, "ewc"))]
    epochs = Cohort(started(configs, tmp_path, data_dir)).epochs()
    for _ in range(2):  # task 1, epochs 1 and 2 of 3: then the process "dies"
        next(epochs)
    benchmark_of = lambda config: build_benchmark(**config.data_arguments(), data_dir=data_dir)
    resumed = [start_or_resume(tmp_path / f"run{index}", benchmark_of)[0] for index in range(2)]
    assert all(run.position == {"task": 0, "epoch": 1, "finished": False} for run in resumed)
    outcomes = Cohort(resumed).run()
    for config, run in zip(configs, resumed):
        reference, metrics = alone(config, tmp_path / f"alone-{config.seed}", data_dir)
        assert_same_run(run, reference, outcomes[run], metrics)


def test_a_failing_run_leaves_the_cohort_and_the_others_train_on(tmp_path, data_dir):
    stable = TrainConfig(method="ewc", seed=0, **SMALL)
    too_stiff = TrainConfig(method="ewc", seed=1, **{**SMALL, "ewc_lambda": 1e9})
    runs = started([stable, too_stiff], tmp_path, data_dir)
    outcomes = Cohort(runs).run()
    assert isinstance(outcomes[runs[1]], UnstableStrength)  # refused at task 2's start
    assert load_checkpoint(runs[1].run_dir / CHECKPOINT_NAME)["position"]["task"] == 0
    reference, metrics = alone(stable, tmp_path / "alone", data_dir)
    assert_same_run(runs[0], reference, outcomes[runs[0]], metrics)


def test_runs_that_cannot_share_a_stack_are_refused(tmp_path, data_dir):
    runs = started([TrainConfig(seed=0, **SMALL),
                    TrainConfig(seed=1, **{**SMALL, "hidden": (16,)})], tmp_path, data_dir)
    with pytest.raises(TrainingError, match="cannot train in a cohort"):
        Cohort(runs)
    momentum = started([TrainConfig(momentum=0.9, **SMALL)], tmp_path / "m", data_dir)
    with pytest.raises(TrainingError, match="no momentum"):
        Cohort(momentum)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cohort_on_the_gpu_equals_the_cpu_runs(tmp_path, data_dir):
    configs = [TrainConfig(method=method, seed=seed, **SMALL)
               for seed, method in enumerate(("finetune", "si", "ewc"))]
    cohort = Cohort(started(configs, tmp_path / "sync", data_dir, device="cuda"))
    for run in cohort.runs:
        run.begin_epoch()
    head = cohort.runs[0].heads[0]
    targets_of = target_map(head, cohort.runs[0].benchmark.num_classes, "cuda")
    epochs = [batches(run.benchmark.tasks[0].x_train, run.benchmark.tasks[0].y_train,
                      run.config.batch_size, torch.Generator().manual_seed(run.config.seed))
              for run in cohort.runs]
    steps = [(torch.stack([xb for xb, _ in pairs]), torch.stack([yb for _, yb in pairs]))
             for pairs in zip(*epochs)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the eager stacked steps never wait for the host
    try:
        for x, y in steps:
            cohort.steps.step(x, y, head, targets_of)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_gpu = started(configs, tmp_path / "gpu2", data_dir, device="cuda")
    cohort = Cohort(on_gpu)
    outcomes = cohort.run()
    assert any(isinstance(step, GraphedStep) for step in cohort.steps.graphs.captured.values())
    for config, run in zip(configs, on_gpu):
        reference, metrics = alone(config, tmp_path / f"cpu-{config.seed}", data_dir)
        for name, tensor in reference.model.state_dict().items():
            torch.testing.assert_close(run.model.state_dict()[name].cpu(), tensor, rtol=1e-3,
                                       atol=1e-4)
        assert outcomes[run]["acc_matrix"][-1] == pytest.approx(metrics["acc_matrix"][-1],
                                                                 abs=0.03)
