"""The training loop in-process: every method with and without DHP, metrics, checkpoints and exact
resume on synthetic MNIST-format files (the fast lane); the paper's Split MNIST accuracy and
consolidation against forgetting on the real files."""

import hashlib
import json
import re

import pytest
import torch

from dhp_deploy.tasks import build_benchmark
from dhp_deploy.config import build_model
from dhp_deploy.network import DHPNet
from dhp_deploy.run_dir import load_checkpoint, load_model
from dhp_deploy.metrics import (average_accuracies, backward_transfer, final_accuracy, forgetting,
                                forgetting_per_task, summarize)
from dhp_deploy.regularizers import METHODS
from dhp_deploy.steps import derived_generator
from dhp_deploy.train import TrainConfig, TrainingDiverged, TrainingRun
from synthetic import split_benchmark


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # This machine is shared: two OpenMP threads fighting other processes for two cores run
    # several times slower than one. Results do not depend on it; restore for other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(config: TrainConfig, run_dir, data_dir, **hooks):
    benchmark = build_benchmark(**config.data_arguments(), data_dir=data_dir)
    run = TrainingRun.start(config, benchmark, run_dir, **hooks)
    return run, run.run()


# 256 examples in batches of 32: 8 steps per epoch.
TINY = dict(benchmark="split-mnist", num_tasks=2, epochs=1, hidden=(32,), train_limit=256,
            test_limit=100, batch_size=32, lr=0.1, fisher_samples=64,
            # lr 0.1 (fast tiny runs) needs gentler penalties than the searched lr-0.01 defaults
            ewc_lambda=100.0, si_c=0.1, mas_lambda=0.1)


# ---------------------------------------------------------------------- metrics by hand

def test_metrics_of_a_known_matrix():
    matrix = [[0.9, 0.1, 0.2],
              [0.7, 0.8, 0.3],
              [0.6, 0.5, 0.9]]
    assert average_accuracies(matrix) == pytest.approx([0.9, 0.75, 2.0 / 3])
    assert final_accuracy(matrix) == pytest.approx(2.0 / 3)
    assert backward_transfer(matrix) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert forgetting_per_task(matrix) == pytest.approx([0.3, 0.3])  # max over l ≥ j only
    assert forgetting(matrix) == pytest.approx(0.3)
    one_task = summarize([[0.95, 0.5]])
    assert one_task["bwt"] is None and one_task["forgetting"] is None
    assert one_task["acc"] == pytest.approx(0.725)


# ---------------------------------------------------------------------- every method runs

@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_and_without_dhp(method, dhp, tmp_path, synthetic_mnist):
    config = TrainConfig(method=method, dhp=dhp, **TINY)
    run, metrics = train(config, tmp_path, synthetic_mnist)
    torch.manual_seed(config.seed)
    initial = build_model(run.config_json)  # same seed → the run's starting weights
    matrix = metrics["acc_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][0] > 0.75 and matrix[1][1] > 0.75  # both tasks learnt (chance: 0.5)
    for key in ("acc_matrix", "avg_acc", "acc", "bwt", "forgetting", "config", "timings"):
        assert key in metrics
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["acc_matrix"] == matrix and on_disk["config"]["training"]["method"] == method
    assert (tmp_path / "metrics.csv").read_text().startswith("after_task,task_0,task_1,avg_acc")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text()) == run.config_json
    if dhp:  # the plasticity parameters learn, the trace fills
        assert not torch.equal(run.model.head.alpha.detach(), initial.head.alpha)
        assert not torch.equal(run.model.head.eta.detach(), initial.head.eta)
        assert run.model.head.hebb.abs().sum() > 0


def test_trace_is_not_reset_between_tasks(tmp_path, synthetic_mnist):
    config = TrainConfig(method="finetune", **{**TINY, "epochs": 1})
    hebb_after_task0 = {}

    def remember(steps):
        if steps == 8:  # the last step of task 0
            hebb_after_task0["value"] = run_holder[0].model.head.hebb.clone()

    run_holder = []
    benchmark = build_benchmark(**config.data_arguments(), data_dir=synthetic_mnist)
    run = TrainingRun.start(config, benchmark, tmp_path, on_step=remember)
    run_holder.append(run)
    run.run()
    before, after = hebb_after_task0["value"], run.model.head.hebb
    # Task 1 trains classes 2 and 3 only: classes 0 and 1 keep task 0's columns exactly.
    assert before[:, :2].abs().sum() > 0
    assert torch.equal(after[:, :2], before[:, :2])
    assert not torch.equal(after[:, 2:4], before[:, 2:4])


# ---------------------------------------------------------------------- the paper's accuracy

def test_split_mnist_one_epoch_finetune_with_dhp_reaches_95_percent(tmp_path, data_dir):
    # The paper's protocol (784-256-256, SGD lr 0.01, batch 64) with 1 epoch instead of 10, on the
    # full training set of every task.
    config = TrainConfig(benchmark="split-mnist", method="finetune", dhp=True, epochs=1)
    _, metrics = train(config, tmp_path, data_dir)
    assert metrics["avg_acc"][-1] >= 0.95, metrics["acc_matrix"]


# ---------------------------------------------------------------------- consolidation works

# SGD with momentum 0.9 on a 64-unit MLP: finetune forgets 0.10-0.15 of task 0 here, enough to show
# a margin that is more than seed noise (the regularisers keep it under ~0.02 for seeds 0-2).
FORGETTING_RUN = dict(benchmark="permuted-mnist", num_tasks=2, dhp=False, hidden=(64,), epochs=1,
                      lr=0.05, momentum=0.9, train_limit=20000, test_limit=1000)
STRENGTHS = {"ewc": {"ewc_lambda": 100.0}, "si": {"si_c": 0.5}, "mas": {"mas_lambda": 0.5}}
MARGIN = 0.04


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ewc_si_and_mas_forget_less_than_finetune(seed, tmp_path, data_dir):
    forgotten = {}
    for method in ["finetune", *STRENGTHS]:
        config = TrainConfig(method=method, seed=seed, **FORGETTING_RUN,
                             **STRENGTHS.get(method, {}))
        _, metrics = train(config, tmp_path / method, data_dir)
        forgotten[method] = metrics["forgetting_per_task"][0]
    for method in STRENGTHS:
        assert forgotten[method] <= forgotten["finetune"] - MARGIN, forgotten


# ---------------------------------------------------------------------- checkpoints and resume

class Interrupted(Exception):
    pass


def test_resume_mid_task_is_bit_identical(tmp_path, synthetic_mnist):
    config = TrainConfig(method="si", momentum=0.9, **{**TINY, "epochs": 3})
    straight, straight_metrics = train(config, tmp_path / "straight", synthetic_mnist)

    def stop_mid_epoch(steps):  # 8 steps per epoch: step 36 is inside task 1, epoch 1
        if steps == 36:
            raise Interrupted

    benchmark = build_benchmark(**config.data_arguments(), data_dir=synthetic_mnist)
    with pytest.raises(Interrupted):
        TrainingRun.start(config, benchmark, tmp_path / "cut", on_step=stop_mid_epoch).run()
    payload = load_checkpoint(tmp_path / "cut")
    assert payload["position"] == {"task": 1, "epoch": 0, "finished": False}
    resumed = TrainingRun.resume(payload, benchmark, tmp_path / "cut")
    resumed_metrics = resumed.run()
    assert resumed_metrics["acc_matrix"] == straight_metrics["acc_matrix"]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    for name, tensor in straight.regularizer.state_dict().items():
        assert torch.equal(tensor, resumed.regularizer.state_dict()[name]), name


def test_checkpoint_layout_feeds_load_model_and_rebuilds_the_test_sets(tmp_path, synthetic_mnist):
    config = TrainConfig(method="ewc", val_fraction=0.25, **TINY)
    run, _ = train(config, tmp_path, synthetic_mnist)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert len(written["val_acc_matrix"]) == 2 and len(written["val_avg_acc"]) == 2
    model, payload = load_model(tmp_path)
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert payload["position"]["finished"]
    assert payload["benchmark"]["tasks"][1]["classes"] == [2, 3]
    # Each setting once; how many processes trained it (data-parallel) is not a setting.
    assert set(payload["config"]) == {"config_version", "training", "data_shape", "versions",
                                      "world_size", "backend"}
    assert payload["config"]["data_shape"] == {"in_features": 784, "num_classes": 10}
    assert (payload["config"]["world_size"], payload["config"]["backend"]) == (1, None)
    rebuilt = build_benchmark(**TrainConfig.from_json(payload["config"]).data_arguments(),
                              data_dir=synthetic_mnist)
    for original, again in zip(run.benchmark.tasks, rebuilt.tasks):
        assert torch.equal(original.x_test, again.x_test)
        assert torch.equal(original.y_test, again.y_test)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config == payload["config"]
    assert saved_config["versions"]["torch"] == str(torch.__version__)


def test_batch_order_depends_only_on_seed_task_and_epoch():
    draws = [torch.randperm(100, generator=derived_generator(3, "batches", 1, 2)) for _ in range(2)]
    assert torch.equal(*draws)
    other = torch.randperm(100, generator=derived_generator(3, "batches", 1, 3))
    assert not torch.equal(draws[0], other)


@pytest.mark.parametrize("eta, cause", [(-20.0, "learned rate η was -20, outside [0, 1]"),
                                        (0.01, "try a lower --lr")])
def test_a_diverged_run_names_its_cause(tmp_path, eta, cause):
    # η < 0 makes the trace update (1 − η)·Hebb grow geometrically: the plastic head diverges at
    # any learning rate, so "lower --lr" would be the wrong advice; with η in [0, 1] a huge lr is
    # the cause and the advice stands.
    config = TrainConfig(benchmark="split-mnist", method="finetune", dhp=True, epochs=2,
                         batch_size=16, hidden=(16,), lr=0.01 if eta < 0 else 1e30,
                         eta_bound=False)  # the paper's free η
    run = TrainingRun.start(config, split_benchmark(20, train=256, test=32), tmp_path)
    with torch.no_grad():
        run.model.head.eta.fill_(eta)
    run.save()
    with pytest.raises(TrainingDiverged, match=re.escape(cause)):
        run.run()


def test_random_streams_are_named_by_their_sha256():
    # Recorded runs replay only if the streams never change: the batches of (seed 3, task 1,
    # epoch 2) are the sha256 of that name, as when the results were made.
    def named(text):
        digest = hashlib.sha256(text.encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    assert torch.equal(torch.randperm(50, generator=derived_generator(3, "batches", 1, 2)),
                       torch.randperm(50, generator=named("dhp-train/3/batches/1/2")))
    from dhp_deploy.tasks import _generator
    assert torch.equal(torch.randperm(50, generator=_generator(7, 2, 4)),
                       torch.randperm(50, generator=named("dhp/7/2/4")))


# ---------------------------------------------------------------------- the trace's diagnostics

def _dhp_run(tmp_path, name, **overrides):
    config = TrainConfig(**{**dict(benchmark="split-mnist", method="si", dhp=True, epochs=2,
                                   batch_size=16, hidden=(16,), lr=0.1, si_c=0.1,
                                   eta_bound=False), **overrides})
    return TrainingRun.start(config, split_benchmark(20, train=128, test=64, num_tasks=3),
                             tmp_path / name)


def test_trace_diagnostics_evaluate_every_task_three_ways(tmp_path):
    from dhp_deploy.evaluation import evaluate

    run = _dhp_run(tmp_path, "dhp")
    metrics = run.run()
    acc, zeroed, own = (metrics[name] for name in
                        ("acc_matrix", "acc_matrix_trace_zeroed", "acc_matrix_own_trace"))
    assert len(zeroed) == len(own) == len(acc) == 3 and all(len(row) == 3 for row in zeroed)
    # A task's own trace at the end of that task is the trace it was evaluated with then.
    assert [own[i][i] for i in range(3)] == [acc[i][i] for i in range(3)]
    assert own[-1][-1] == acc[-1][-1] and own[0][1:] == acc[0][1:]  # not yet learned: current
    # Zeroed equals an independent evaluation of the same weights without any trace.
    plain_eval = build_model(run.config_json)
    plain_eval.load_state_dict(run.model.state_dict())
    plain_eval.head.hebb.zero_()
    assert evaluate(plain_eval, run.benchmark) == zeroed[-1]
    assert evaluate(run.model, run.benchmark) == acc[-1]  # the model's own trace is back
    # ... and the saved traces are the checkpoint's, so the own-trace row replays from it.
    saved = load_checkpoint(tmp_path / "dhp")["saved_traces"]
    assert len(saved) == 3 and saved[0][0].shape == (16, 6)
    plain_eval.head.hebb.copy_(saved[0][0])
    assert evaluate(plain_eval, run.benchmark)[0] == own[-1][0]
    diagnostics = metrics["trace_diagnostics"]
    assert len(diagnostics) == 3 and set(diagnostics[0]) == {
        "eta", "max_abs_hebb", "plastic_to_slow", "mean_abs_alpha", "lr_max_curvature"}
    assert diagnostics[0]["lr_max_curvature"] == 0.0 < diagnostics[1]["lr_max_curvature"]  # SI
    assert diagnostics[-1]["max_abs_hebb"] == run.model.head.hebb.abs().max().item()
    written = json.loads((tmp_path / "dhp" / "metrics.json").read_text())
    assert written["acc_matrix_own_trace"] == own


@pytest.mark.parametrize("shared_trunk", [True, False], ids=["DHPNet", "other model"])
def test_one_evaluation_pass_gives_each_trace_its_own_row(shared_trunk):
    # The rows of one shared pass equal separate evaluations, the model's trace comes back, and a
    # model that is not a trunk + head network is run whole for each entry.
    from dhp_deploy.evaluation import evaluate, evaluate_with_traces

    torch.manual_seed(3)
    net = DHPNet(20, 6, hidden=(16,), dhp=True)
    with torch.no_grad():
        net.head.alpha.uniform_(-1, 1)
        net.head.hebb.uniform_(0, 2)
    model = net if shared_trunk else torch.nn.Sequential(net)
    benchmark = split_benchmark(20, train=32, test=2500, num_tasks=3)  # 3 evaluation batches
    own = net.head.hebb.clone()
    sets = [None, lambda k: [torch.zeros_like(own)], lambda k: [own.flip(0) * k]]
    rows, seconds = evaluate_with_traces(model, benchmark, sets)
    assert rows == [evaluate(model, benchmark, traces=traces) for traces in sets]
    assert rows[0] != rows[1] != rows[2] and len(seconds) == 3 and min(seconds) > 0
    assert torch.equal(net.head.hebb, own) and net.training


def test_trace_diagnostics_resume_exactly_and_skip_plain_heads(tmp_path):
    straight = _dhp_run(tmp_path, "straight").run()

    def stop(steps):  # 8 steps per epoch, 2 epochs per task: step 40 is inside task 3
        if steps == 40:
            raise Interrupted
    cut = _dhp_run(tmp_path, "cut")
    cut.on_step = stop
    with pytest.raises(Interrupted):
        cut.run()
    resumed = TrainingRun.resume(load_checkpoint(tmp_path / "cut"), cut.benchmark, tmp_path / "cut")
    again = resumed.run()
    for name in ("acc_matrix", "acc_matrix_trace_zeroed", "acc_matrix_own_trace",
                 "trace_diagnostics"):
        assert again[name] == straight[name], name
    plain = _dhp_run(tmp_path, "plain", dhp=False).run()
    assert "acc_matrix_own_trace" not in plain and "trace_diagnostics" not in plain


@pytest.mark.parametrize("eta_bound", [False, True], ids=["free", "bounded"])
def test_eta_bound_keeps_eta_in_the_unit_interval(tmp_path, eta_bound):
    # η starting at 0 on this stream is pushed below it by its gradient (free: the test's
    # premise); bounded, every step leaves it in [0, 1].
    run = _dhp_run(tmp_path, str(eta_bound), method="finetune", lr=0.5, eta_bound=eta_bound)
    with torch.no_grad():
        run.model.head.eta.fill_(0.0)
    seen = []
    run.on_step = lambda steps: seen.append(run.model.head.eta.item())
    run.run()
    if eta_bound:
        assert 0.0 <= min(seen) and max(seen) <= 1.0 and max(seen) > 0.0
        assert json.loads((tmp_path / "True" / "config.json").read_text())[
            "training"]["eta_bound"] is True
    else:
        assert min(seen) < 0.0


def test_dhp_train_bounds_eta_by_default_and_old_runs_read_as_free():
    # Users get η kept in [0, 1]; a run saved before the option existed trained with η free.
    assert TrainConfig().eta_bound is True
    assert TrainConfig.from_json({"training": {"benchmark": "split-mnist"}}).eta_bound is False


@pytest.mark.parametrize("trace_reset", [False, True], ids=["kept", "reset"])
def test_trace_reset_zeroes_the_trace_at_each_later_task_start(tmp_path, trace_reset):
    run = _dhp_run(tmp_path, str(trace_reset), method="finetune", epochs=1,
                   trace_reset=trace_reset)
    starts = []
    epochs = run.epochs()
    for _ in range(3):
        next(epochs)  # one epoch = one task here
        if run.position["finished"]:
            break
        run.begin_epoch()  # as the loop does before the next task's first step
        starts.append(run.model.head.hebb.abs().max().item())
    assert len(starts) == 2
    assert (max(starts) == 0.0) == trace_reset
    assert run.saved_traces[0][0].abs().max() > 0  # what task 1 learned is still recorded
