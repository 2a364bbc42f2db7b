r"""The lean training step: a DHPNet's forward and hand-written backward, no autograd graph.

For the networks we train (a Linear+ReLU trunk and a DHP-Softmax or plain head) the gradient of
the cross-entropy is a handful of matmuls. Written out, a step is those matmuls plus a few
elementwise ops: no graph to record, no autograd nodes, no per-op bookkeeping. On a 2-core CPU at
batch 64 the generic autograd step spent about half its time outside the matmuls; this one stays
close to them (benchmarks/bench_train.py measures both side by side).

The maths is the autograd step's (tests/test_lean_step.py checks values and gradients against
autograd in float64 to 1e-12): with ``h`` the trunk's output, ``H' = lerp(Hebb, Mᵀ, η·[c present])``
the updated trace (``M`` the per-class means of ``h``), ``W = θ + α ⊙ H'`` and ``z = h W``:

    dW = hᵀ dz,   dθ = dW,   dα = dW ⊙ H',   dH' = dW ⊙ α,
    dη = Σ dH' ⊙ (Mᵀ − Hebb) ⊙ [c present],
    dh = dz Wᵀ + (dH' ⊙ η[c present])ᵀ[y] / count[y]      (through the class means),

and for each trunk layer ``a = h_in Aᵀ + b``, ``h_out = relu(a)``: ``da = dh_out ⊙ [h_out > 0]``,
``dA = daᵀ h_in``, ``db = Σ_rows da``, ``dh_in = da A``. Floating-point rounding differs from the
autograd step (other op order), so the two are equal to rounding, not bit for bit.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from dhp_deploy.layer import DHPSoftmax, class_means
from dhp_deploy.network import DHPNet, PlainHead

__all__ = ["supports_lean_step", "lean_gradients"]


def supports_lean_step(model: nn.Module) -> bool:
    r"""True for a :class:`DHPNet` whose trunk is Linear and ReLU layers only."""
    if not isinstance(model, DHPNet) or not isinstance(model.head, (DHPSoftmax, PlainHead)):
        return False
    layers = list(model.trunk)
    return (len(layers) % 2 == 0
            and all(isinstance(m, nn.Linear) for m in layers[0::2])
            and all(isinstance(m, nn.ReLU) for m in layers[1::2]))


def lean_gradients(model: DHPNet, x: Tensor, y: Tensor, head: Optional[Tensor],
                   targets: Tensor) -> tuple[dict, Tensor, Tensor, Tensor]:
    r"""One training forward and backward of ``model`` on ``(x, y)``, without autograd.

    ``head`` holds the task's class ids (multi-head: the loss covers those logits, ``targets``
    are positions within them) or is None (all classes, ``targets`` = ``y``). The DHP head's
    trace is updated (stored, as in a training forward). Returns ``(grads, loss, logits, hits)``:
    the gradient of the mean cross-entropy for every parameter (keyed by the parameter object's
    ``id``), the loss, the logits the loss used, and the number of correct predictions.
    """
    with torch.no_grad():
        linears = list(model.trunk)[0::2]
        activations = [x]
        for linear in linears:
            activations.append(torch.addmm(linear.bias, activations[-1], linear.weight.t())
                               .clamp_min_(0))
        h = activations[-1]
        if isinstance(model.head, DHPSoftmax):
            logits_all, head_backward = _dhp_head(model.head, h, y)
        else:
            logits_all, head_backward = _plain_head(model.head, h)
        logits = logits_all if head is None else logits_all.index_select(1, head)
        loss, dlogits = _cross_entropy_and_gradient(logits, targets)
        dz = dlogits if head is None else \
            torch.zeros_like(logits_all).index_copy_(1, head, dlogits)
        dh, grads = head_backward(dz)
        for index in range(len(linears) - 1, -1, -1):
            linear = linears[index]
            # ReLU's backward, as autograd computes it: the gradient where the output is > 0.
            da = torch.ops.aten.threshold_backward(dh, activations[index + 1], 0)
            grads[id(linear.weight)] = da.t().matmul(activations[index])
            grads[id(linear.bias)] = da.sum(0)
            if index > 0:  # the input needs no gradient
                dh = da.matmul(linear.weight)
        hits = (logits.argmax(1) == targets).sum()
    return grads, loss, logits, hits


def _dhp_head(layer: DHPSoftmax, h: Tensor, y: Tensor):
    r"""The DHP head's training forward (trace stored) and a closure for its backward."""
    means, counts = class_means(h, y, layer.out_features)
    present = (counts > 0).to(h.dtype)
    rate = layer.eta * present  # η for the classes in the batch, 0 for the others
    old = layer.hebb
    means_t = means.t()
    hebb = torch.lerp(old, means_t, rate)
    effective = torch.addcmul(layer.w, layer.alpha, hebb)
    logits = h.matmul(effective)

    def backward(dz: Tensor):
        d_effective = h.t().matmul(dz)
        d_hebb = d_effective * layer.alpha
        d_eta = (d_hebb * (means_t - old)).matmul(present).sum().reshape(1)
        d_means = (d_hebb * rate).t().div_(counts.clamp_min(1.0).unsqueeze(1))
        dh = dz.matmul(effective.t()).add_(d_means.index_select(0, y))
        # The stored trace, as the layer's training forward leaves it, written into the same
        # buffer once dη no longer needs the old one: a step replayed as a CUDA graph
        # (dhp_deploy.cuda_graph) reads and writes the trace at one fixed address.
        old.copy_(hebb)
        return dh, {id(layer.w): d_effective, id(layer.alpha): d_effective * hebb,
                    id(layer.eta): d_eta}

    return logits, backward


def _plain_head(layer: PlainHead, h: Tensor):
    weight = layer.linear.weight
    logits = h.matmul(weight.t())

    def backward(dz: Tensor):
        return dz.matmul(weight), {id(weight): dz.t().matmul(h)}

    return logits, backward


def _cross_entropy_and_gradient(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean cross-entropy and its gradient with respect to ``logits``: (softmax − onehot) / B."""
    log_probs = torch.log_softmax(logits, dim=1)
    rows = torch.arange(len(targets), device=logits.device)
    loss = -log_probs[rows, targets].mean()
    gradient = log_probs.exp_()
    gradient[rows, targets] -= 1.0
    return loss, gradient.div_(len(targets))
