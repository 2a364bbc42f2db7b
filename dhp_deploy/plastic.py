r"""The plastic inference model: a trained DHP network that keeps learning after deployment.

A frozen bundle folds the Hebbian trace into the head and can never learn again. A plastic
bundle instead makes the trace explicit state that the caller (or an inference server's sequence
batcher) carries from call to call::

    logits, hebb_out = model(input, labels, hebb)

- ``input`` float32 ``(N, F)``: pixels, as for the frozen model;
- ``labels`` int64 ``(N,)``: each row's class, or ``-1`` for "no label";
- ``hebb`` float32 ``(H, C)``: the trace to use (the bundle ships the one at export, ``hebb.npy``).

"Predict, then learn": ``logits`` are the eval-mode layer's, computed with the trace given, and
``hebb_out`` is that trace after one step of Algorithm 1 on the *labelled* rows only: each class
with at least one labelled row moves its column to ``(1 − η)·Hebb + η·mean(h)``; every other
column is returned unchanged, bit for bit (its rate is exactly 0), so an all-unlabelled call
returns the trace it was given. θ, α, η and the trunk are frozen constants.

The class means are a one-hot matmul rather than ``index_add``: static shapes, and ``-1`` rows
simply match no class, which keeps the graph exportable to TorchScript, ONNX and ``torch.export``.
"""

import copy

import torch
from torch import Tensor, nn

from dhp_deploy.bundle import NO_LABEL
from dhp_deploy.layer import DHPSoftmax, dhp_logits, hebbian_update
from dhp_deploy.network import DHPNet

__all__ = ["PlasticMLP", "plastic_model", "reference_step"]


class PlasticMLP(nn.Module):
    r"""The trunk and a DHP head whose trace is an input and an output (see the module doc)."""

    def __init__(self, trunk: nn.Sequential, w: Tensor, alpha: Tensor, eta: Tensor) -> None:
        super().__init__()
        self.trunk = trunk
        self.register_buffer("w", w.detach().clone())
        self.register_buffer("alpha", alpha.detach().clone())
        self.register_buffer("eta", eta.detach().clone().reshape(1))
        self.register_buffer("classes", torch.arange(w.shape[1]))

    def forward(self, x: Tensor, labels: Tensor, hebb: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        logits = dhp_logits(h, self.w, self.alpha, hebb)
        onehot = (labels.unsqueeze(1) == self.classes.unsqueeze(0)).to(h.dtype)  # (N, C)
        counts = onehot.sum(0)
        # Unlabelled rows zeroed before the matmul: a NaN in one would reach every class's mean
        # through 0 · NaN = NaN, though no class takes it.
        labelled = torch.where(onehot.sum(1, keepdim=True) > 0, h, torch.zeros_like(h))
        means = onehot.t().matmul(labelled) / counts.clamp_min(1.0).unsqueeze(1)  # (C, H)
        rate = self.eta * (counts > 0).to(h.dtype)
        return logits, torch.lerp(hebb, means.t(), rate)


def plastic_model(model: DHPNet) -> PlasticMLP:
    r"""The plastic inference model of a trained DHP network (the network is not modified)."""
    if not isinstance(model.head, DHPSoftmax):
        raise ValueError("a plastic model needs a DHP head; this network's head is plain")
    head = model.head
    plastic = PlasticMLP(copy.deepcopy(model.trunk), head.w, head.alpha, head.eta).eval()
    plastic.requires_grad_(False)
    return plastic


@torch.no_grad()
def reference_step(model: DHPNet, x: Tensor, labels: Tensor, hebb: Tensor) -> tuple[Tensor, Tensor]:
    r"""The same call through the eager layer: eval-mode logits with ``hebb``, then the layer's
    own Algorithm-1 update on the labelled rows (the oracle the exported models are checked
    against)."""
    head = model.head
    h = model.trunk(x)
    logits = dhp_logits(h, head.w, head.alpha, hebb)
    known = labels != NO_LABEL
    if not bool(known.any()):
        return logits, hebb.clone()
    return logits, hebbian_update(hebb, h[known], labels[known], head.eta)
