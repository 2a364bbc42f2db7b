"""A regulariser is declared in one class: a toy method registered in this file alone trains
through dhp-train's command, and a method that defines only its penalty is right on the lean path."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from dhp_deploy import regularizers
from dhp_deploy.cli.train import main as dhp_train
from dhp_deploy.config import TrainConfig
from dhp_deploy.importance import flat_slow_weights
from dhp_deploy.regularizers import EWC_LAMBDA, REGISTRY, Regularizer, register
from dhp_deploy.train import TrainingRun
from synthetic import split_benchmark


class AnchoredL2(Regularizer):
    r"""``(λ/2)·‖θ − θ*‖²`` with θ* the slow weights after the latest task: only ``penalty``,
    no closed form, so the lean step takes its gradient from the base class (autograd)."""

    name, display = "anchored-l2", "Anchored L2 (test)"
    options = {"ewc_lambda": EWC_LAMBDA}
    strength_option = "ewc_lambda"

    def __init__(self, ewc_lambda: float) -> None:
        self.ewc_lambda, self.anchor = ewc_lambda, None

    def after_task(self, model, inputs, classes, generator, replicas=None) -> None:
        self.anchor = flat_slow_weights(model).detach().clone()

    def penalty(self, model):
        if self.anchor is None:
            return 0.0
        return self.ewc_lambda / 2 * (flat_slow_weights(model) - self.anchor).square().sum()

    def max_curvature(self) -> float:
        return self.ewc_lambda if self.anchor is not None else 0.0

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = state["anchor"]


@pytest.fixture
def toy():
    register(AnchoredL2)
    yield AnchoredL2
    del REGISTRY[AnchoredL2.name]


def test_the_built_in_methods_declare_what_the_tables_hold():
    assert regularizers.METHODS == ("finetune", "ewc", "online-ewc", "si", "mas")
    assert set(TrainConfig().regularizer_arguments()) == set(regularizers.OPTIONS)
    for name, cls in REGISTRY.items():
        assert set(cls.searched) <= set(regularizers.SEARCHED_STRENGTHS), name
        assert cls.strength_option is None or cls.strength_option in cls.options


def test_an_option_declared_twice_differently_is_refused():
    class Clash(Regularizer):
        name, options = "clash", {"ewc_lambda": regularizers.Option(1.0, "another λ")}

    with pytest.raises(ValueError, match="declared twice"):
        register(Clash)
    assert "clash" not in REGISTRY


def test_a_penalty_only_method_trains_alike_on_the_lean_and_the_autograd_path(toy, tmp_path):
    config = TrainConfig(benchmark="split-mnist", method=toy.name, epochs=2, batch_size=16,
                         lr=0.05, hidden=(16,), ewc_lambda=5.0)
    runs = {}
    for lean in (True, False):
        run = TrainingRun.start(config, split_benchmark(20), tmp_path / str(lean), lean=lean)
        run.run()
        runs[lean] = run
    for (name, a), b in zip(runs[True].model.state_dict().items(),
                            runs[False].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # And the penalty acts: in task 2 the slow weights leave task 1's end less than fine-tuning
    # lets them (the same init, data and batches).
    def slow_after(method, tasks):
        benchmark = split_benchmark(20)
        benchmark = replace(benchmark, tasks=benchmark.tasks[:tasks])  # the same heads
        run = TrainingRun.start(replace(config, method=method), benchmark,
                                tmp_path / f"{method}-{tasks}")
        run.run()
        return flat_slow_weights(run.model).detach()

    first = slow_after("finetune", 1)
    toy_drift = (flat_slow_weights(runs[True].model).detach() - first).norm()
    plain_drift = (slow_after("finetune", 2) - first).norm()
    assert toy_drift < 0.8 * plain_drift


def test_a_registered_method_trains_through_dhp_train(toy, tmp_path, data_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(dhp_train, [
        "--benchmark", "split-mnist", "--method", toy.name, "--ewc-lambda", "5", "--epochs", "1",
        "--num-tasks", "2", "--train-limit", "200", "--test-limit", "100", "--hidden", "16",
        "--data-dir", str(data_dir), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["training"]
    assert (config["method"], config["ewc_lambda"]) == (toy.name, 5.0)
    assert len(json.loads((out / "metrics.json").read_text())["acc_matrix"]) == 2
    unknown = CliRunner().invoke(dhp_train, ["--benchmark", "split-mnist", "--method", "nope",
                                             "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and toy.name in unknown.output
