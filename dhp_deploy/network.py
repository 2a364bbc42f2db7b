r"""The networks we train: an MLP trunk with a DHP-Softmax head, or with a plain linear head."""

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from dhp_deploy.layer import DHPSoftmax, init_slow_weights_

__all__ = ["DHPNet", "PlainHead", "task_logits", "predicted_classes", "default_head_init",
           "plastic_parameters"]


def default_head_init(dhp: bool) -> str:
    r"""The paper's setup: the authors' θ init for the DHP head, ``nn.Linear``'s for the plain one
    (the authors' baselines are standard layers)."""
    return "authors" if dhp else "linear"


def plastic_parameters(model: nn.Module) -> list[nn.Parameter]:
    r"""α and η of every DHP-Softmax layer in ``model``: what consolidation never anchors.

    Found by module type, not by name, so wrappers that prefix names (DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``) change nothing.
    """
    return [p for m in model.modules() if isinstance(m, DHPSoftmax) for p in (m.alpha, m.eta)]


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
        head_init: how the head's slow weights θ are initialised (``"authors"`` or ``"linear"``,
            see :data:`dhp_deploy.layer.WEIGHT_INITS`), for either head. Default None: the paper's
            setup, ``"authors"`` for the DHP head and ``"linear"`` for the plain head.

    ``forward(x, y=None)``: labels are used only by the DHP head, in training mode, to update its
    trace; the plain head ignores them.
    """

    __constants__ = ["dhp"]
    dhp: bool

    def __init__(self, in_features: int = 784, num_classes: int = 10,
                 hidden: Sequence[int] = (256, 256), dhp: bool = True, eta_init: float = 0.01,
                 head_init: Optional[str] = None, device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.dhp = dhp
        self.head_init = head_init or default_head_init(dhp)
        layers = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size, **factory), nn.ReLU()]
            width = size
        self.trunk = nn.Sequential(*layers)
        if dhp:
            self.head = DHPSoftmax(width, num_classes, eta_init=eta_init,
                                   weight_init=self.head_init, **factory)
        else:
            self.head = PlainHead(width, num_classes, weight_init=self.head_init, **factory)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.head(self.trunk(x), y)


class PlainHead(nn.Module):
    r"""Linear softmax head ``z = h · θ`` with the DHP head's call signature (labels ignored).

    ``weight_init="linear"`` keeps :class:`torch.nn.Linear`'s own initialisation. ``"authors"``
    draws θ as the DHP head does, on an ``(in, out)`` tensor (so a plain and a DHP network built
    from the same seed start from the same θ), and stores its transpose.
    """

    def __init__(self, in_features: int, out_features: int, weight_init: str = "linear",
                 device=None, dtype=None) -> None:
        super().__init__()
        rng = torch.get_rng_state()
        self.linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        if weight_init != "linear":
            torch.set_rng_state(rng)  # draw θ from where the DHP head would: same seed, same θ
            with torch.no_grad():
                theta = torch.empty(in_features, out_features, device=device, dtype=dtype)
                self.linear.weight.copy_(init_slow_weights_(theta, weight_init).t())

    def forward(self, h: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.linear(h)


def task_logits(logits: Tensor, classes: Tensor) -> Tensor:
    r"""The columns of ``logits`` that belong to one task (multi-head, task-incremental use).

    ``classes`` holds the task's global class ids (int64); column k of the result is class
    ``classes[k]``, so a target ``y`` maps to its position in ``classes``.
    """
    return logits.index_select(1, classes)


def predicted_classes(logits: Tensor, classes: Optional[Tensor] = None) -> Tensor:
    r"""The predicted global class id of each row: the argmax within a task's ``classes``
    (multi-head evaluation), or over all logits when ``classes`` is None. The one rule the
    training run's evaluation and the exported bundles' accuracy check share."""
    if classes is None:
        return logits.argmax(1)
    classes = classes.to(logits.device)
    return classes[task_logits(logits, classes).argmax(1)]
