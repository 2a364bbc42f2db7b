r"""When training must stop: non-finite losses or weights, and penalties too stiff for SGD.
Each check raises a one-line :class:`TrainingError` that says what is left on disk."""

import math
from pathlib import Path

import torch
from torch import nn

from dhp_deploy.layer import DHPSoftmax
from dhp_deploy.run_dir import CheckpointError, load_checkpoint

__all__ = ["TrainingError", "TrainingDiverged", "UnstableStrength", "check_finite",
           "check_stable", "describe_position"]


class TrainingError(Exception):
    r"""Training cannot go on; the message says why and what is left on disk."""


class TrainingDiverged(TrainingError):
    r"""The loss or the weights stopped being finite (e.g. a learning rate far too high)."""


class UnstableStrength(TrainingDiverged):
    r"""The consolidation penalty is too stiff for SGD at this learning rate: it would diverge."""


def check_finite(model: nn.Module, mean_loss: float, where: str, checkpoint: Path,
                 position: dict) -> None:
    r"""Raise :class:`TrainingDiverged` unless the loss and every floating weight are finite."""
    weights_finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                         if t.is_floating_point())
    if math.isfinite(mean_loss) and weights_finite:
        return
    raise TrainingDiverged(
        f"training diverged in {where} (mean loss {mean_loss}, "
        f"weights {'finite' if weights_finite else 'not finite'}); stopped without saving it. "
        f"The last good checkpoint {checkpoint} ({describe_position(position)})"
        f" is intact; {divergence_hint(model, checkpoint)}")


def divergence_hint(model: nn.Module, checkpoint: Path) -> str:
    r"""Why it diverged, where the last good checkpoint tells: a DHP head whose learned rate η
    left [0, 1] makes the trace update ``(1 − η)·Hebb + η·mean`` grow geometrically."""
    try:
        state = load_checkpoint(checkpoint, map_location="cpu")["model"]
    except (CheckpointError, OSError, KeyError):
        return "try a lower --lr"
    for name, module in model.named_modules():
        if not isinstance(module, DHPSoftmax):
            continue
        eta, hebb = float(state[f"{name}.eta"]), state[f"{name}.hebb"].abs().max().item()
        if not 0.0 <= eta <= 1.0:
            return (f"there the DHP head's learned rate η was {eta:.3g}, outside [0, 1], where "
                    f"the Hebbian trace grows geometrically (max |Hebb| {hebb:.3g}): the "
                    f"plastic head itself diverged (Algorithm 1 does not bound η; "
                    f"--eta-bound keeps it in [0, 1])")
    return "try a lower --lr"


def check_stable(regularizer, lr: float, momentum: float, task_id: int, checkpoint: Path,
                 position: dict) -> None:
    r"""Refuse to start a task whose penalty alone makes SGD diverge (lr · curvature > 2(1+μ))."""
    curvature = regularizer.max_curvature()
    limit = 2 * (1 + momentum)
    if lr * curvature <= limit:
        return
    option = regularizer.strength_option.replace("_", "-")
    strength = regularizer.strength
    stable = strength * limit / (lr * curvature)
    raise UnstableStrength(
        f"--{option} {strength:g} is too strong for SGD at --lr {lr:g} from task {task_id + 1} "
        f"on: the penalty's curvature {curvature:.4g} gives lr·curvature {lr * curvature:.3g} > "
        f"{limit:g}, so training would diverge. The largest stable --{option} is {stable:.3g}; "
        f"stopped before the task's first step. The checkpoint {checkpoint} "
        f"({describe_position(position)}) is intact")


def describe_position(position: dict) -> str:
    if position["epoch"] < 0:
        return f"before task {position['task'] + 1}"
    return f"after task {position['task'] + 1} epoch {position['epoch'] + 1}"
