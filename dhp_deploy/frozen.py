r"""The frozen inference model: a trained network with its latest Hebbian trace folded in.

In eval mode the DHP head computes ``z = h · (θ + α ⊙ Hebb)`` with a fixed trace, so a frozen
bundle stores the one matrix ``(θ + α ⊙ Hebb)ᵀ`` as the weight of a bias-free ``nn.Linear``; the
exported network is then exactly a plain MLP and costs what one costs. The plain baseline head
folds to itself. (The plastic model, whose trace goes on learning: :mod:`dhp_deploy.plastic`.)
"""

import copy

import torch
from torch import Tensor, nn

from dhp_deploy.bundle import ExportError
from dhp_deploy.layer import DHPSoftmax, dhp_logits
from dhp_deploy.network import DHPNet, PlainHead

__all__ = ["FrozenMLP", "fold_model"]


class FrozenMLP(nn.Module):
    r"""The inference network of a bundle: the trunk, then a bias-free linear head.

    ``forward(x)`` maps float32 pixels ``(N, in_features)`` in [0, 1] to logits
    ``(N, num_classes)``; no state, no labels, nothing that depends on the batch.
    """

    def __init__(self, trunk: nn.Sequential, head_weight: Tensor) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False,
                              dtype=head_weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def fold_model(model: DHPNet) -> FrozenMLP:
    r"""The eval-mode network with the latest trace folded in: head weight ``(w + alpha*hebb)ᵀ``.

    The folded matrix is bit-identical to the one the eager head multiplies by on every call (it
    is computed by the layer's own :func:`~dhp_deploy.layer.dhp_logits`). The model is not
    modified.
    """
    for layer in model.trunk:
        if not isinstance(layer, (nn.Linear, nn.ReLU)):
            raise ExportError(f"cannot fold a trunk layer of type {type(layer).__name__}")
    with torch.no_grad():
        if isinstance(model.head, DHPSoftmax):
            head = model.head
            # The layer's own logits function applied to the identity: I·(θ + α⊙Hebb) is that
            # matrix exactly (each entry is 1·m + zeros), computed by the very expression the
            # eager head uses (addcmul today), so the fold cannot drift from the layer.
            eye = torch.eye(head.in_features, dtype=head.w.dtype, device=head.w.device)
            weight = dhp_logits(eye, head.w, head.alpha, head.hebb).t().contiguous()
        elif isinstance(model.head, PlainHead):
            weight = model.head.linear.weight.detach().clone()
        else:
            raise ExportError(f"cannot fold a head of type {type(model.head).__name__}")
    frozen = FrozenMLP(copy.deepcopy(model.trunk), weight).eval()
    frozen.requires_grad_(False)
    return frozen
