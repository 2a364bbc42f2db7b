"""The output layer's θ initialisation (``--head-init``): bounds, defaults, records, old runs."""

import json
import math

import pytest
import torch

from dhp_deploy import DHPNet
from dhp_deploy.run_dir import load_checkpoint, load_model
from dhp_deploy.train import TrainConfig

from cli_helpers import run_cli
from old_runs import as_version_1

HIDDEN, CLASSES = 256, 10
BOUNDS = {"authors": 1 / math.sqrt(CLASSES), "linear": 1 / math.sqrt(HIDDEN)}


def head_theta(net: DHPNet) -> torch.Tensor:
    r"""θ as (in, out), whichever head."""
    return net.head.w.detach() if net.dhp else net.head.linear.weight.detach().t()


@pytest.mark.parametrize("dhp", [True, False])
@pytest.mark.parametrize("head_init", ["authors", "linear"])
def test_theta_fills_the_bound_of_its_init(dhp, head_init):
    torch.manual_seed(0)
    theta = head_theta(DHPNet(hidden=(HIDDEN,), dhp=dhp, head_init=head_init))
    bound = BOUNDS[head_init]
    assert theta.shape == (HIDDEN, CLASSES)
    # 2560 uniform draws: the largest lies within 0.5% of the bound, never past it.
    assert 0.995 * bound < theta.abs().max().item() <= bound
    assert abs(theta.mean().item()) < 0.05 * bound


def test_defaults_are_the_papers_setup_and_same_seed_same_theta():
    assert DHPNet(dhp=True).head_init == "authors" and DHPNet(dhp=False).head_init == "linear"
    torch.manual_seed(3)
    dhp = DHPNet(hidden=(64,), dhp=True, head_init="authors")
    torch.manual_seed(3)
    plain = DHPNet(hidden=(64,), dhp=False, head_init="authors")
    # The ablation's pairs differ by plasticity only: same trunk, same θ.
    assert torch.equal(head_theta(dhp), head_theta(plain))
    for a, b in zip(dhp.trunk.parameters(), plain.trunk.parameters()):
        assert torch.equal(a, b)


def test_config_resolves_and_records_the_init():
    assert TrainConfig(dhp=True).head_init == "authors"
    assert TrainConfig(dhp=False).head_init == "linear"
    assert TrainConfig(dhp=False, head_init="authors").head_init == "authors"
    with pytest.raises(ValueError, match="head_init"):
        TrainConfig(head_init="xavier")
    # A config saved before the option existed was trained with nn.Linear's init.
    old = {"training": {"benchmark": "split-mnist", "method": "finetune", "dhp": True}}
    assert TrainConfig.from_json(old).head_init == "linear"


def test_searched_strengths_are_the_defaults_and_match_the_record():
    from dhp_deploy.regularizers import SEARCHED_STRENGTHS, STRENGTH_OPTION
    from pathlib import Path

    # dhp-train's defaults are the paper protocol's searches (keys without "@protocol"); a
    # benchmark searched only under another protocol uses that one's.
    record = json.loads((Path(__file__).parents[1] / "docs/results/strengths.json").read_text())
    for key, methods in record.items():
        benchmark, _, protocol = key.partition("@")
        if (protocol and benchmark in record) or benchmark.endswith("+dhp"):
            continue  # another protocol's, or searched on the DHP network (a study, not a default)
        for method, entry in methods.items():
            option = STRENGTH_OPTION[method]
            assert SEARCHED_STRENGTHS[benchmark][method] == entry[option], (key, method)
            config = TrainConfig(benchmark=benchmark, method=method)
            assert getattr(config, option) == entry[option]


QUICK = ["--benchmark", "split-mnist", "--num-tasks", "2", "--epochs", "1", "--hidden", "32",
         "--train-limit", "256", "--test-limit", "100", "--batch-size", "32", "--threads", "1"]


def test_cli_records_the_init_and_old_runs_still_load_and_export(tmp_path, data_dir):
    run = tmp_path / "run"
    result = run_cli("train", *QUICK, "--no-dhp", "--head-init", "authors", "--out", run,
                     env={"DHP_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["head_init"] == "authors"
    as_version_1(run, unknown=("head_init",))  # a run from a release before the option
    payload = load_checkpoint(run)
    model, _ = load_model(run)
    assert model.head_init == "linear"  # documented default for old runs; weights are the saved
    assert torch.equal(model.head.linear.weight, payload["model"]["head.linear.weight"])
    exported = run_cli("export", run, "--format", "torchscript", "--out", tmp_path / "bundle",
                       env={"DHP_DATA_DIR": str(data_dir)})
    assert exported.returncode == 0, exported.stderr


def test_predicted_classes_is_the_argmax_within_a_task_head():
    from dhp_deploy.network import predicted_classes

    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 0.5, 9.0]])
    assert predicted_classes(logits).tolist() == [1, 3]
    # Within task {0, 2}: row 0 picks class 2 (1.0 > 0.0) despite class 1's larger logit.
    assert predicted_classes(logits, torch.tensor([0, 2])).tolist() == [2, 0]
