r"""The networks we train: an MLP trunk with a DHP-Softmax head, or with a plain linear head."""

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from dhp_deploy.layer import DHPSoftmax

__all__ = ["DHPNet", "task_logits", "PLASTIC_PARAMETERS"]

# Parameters of the DHP head that consolidation never anchors (DESIGN.md §1: regularisers act on
# slow weights only).
PLASTIC_PARAMETERS = ("head.alpha", "head.eta")


class DHPNet(nn.Module):
    r"""MLP trunk (Linear + ReLU per hidden layer) with a DHP-Softmax or a plain linear head.

    Args:
        in_features: input width (784 for flattened MNIST).
        num_classes: width of the output layer (all classes of the benchmark; multi-head use
            selects a task's columns with :func:`task_logits`).
        hidden: hidden layer widths, default ``(256, 256)`` as in the paper.
        dhp: True for the DHP-Softmax head, False for a plain ``nn.Linear`` head without bias (the
            same slow weights θ without plasticity: the baseline).
        eta_init: initial η of the DHP head.

    ``forward(x, y=None)``: labels are used only by the DHP head, in training mode, to update its
    trace; the plain head ignores them.
    """

    __constants__ = ["dhp"]
    dhp: bool

    def __init__(self, in_features: int = 784, num_classes: int = 10,
                 hidden: Sequence[int] = (256, 256), dhp: bool = True, eta_init: float = 0.01,
                 device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.dhp = dhp
        layers = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size, **factory), nn.ReLU()]
            width = size
        self.trunk = nn.Sequential(*layers)
        if dhp:
            self.head = DHPSoftmax(width, num_classes, eta_init=eta_init, **factory)
        else:
            self.head = PlainHead(width, num_classes, **factory)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.head(self.trunk(x), y)


class PlainHead(nn.Module):
    r"""Linear softmax head ``z = h · θ`` with the DHP head's call signature (labels ignored)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, h: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.linear(h)


def task_logits(logits: Tensor, classes: Tensor) -> Tensor:
    r"""The columns of ``logits`` that belong to one task (multi-head, task-incremental use).

    ``classes`` holds the task's global class ids (int64); column k of the result is class
    ``classes[k]``, so a target ``y`` maps to its position in ``classes``.
    """
    return logits.index_select(1, classes)
