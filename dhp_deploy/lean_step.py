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

The maths is written once, on plain tensors (:func:`step_gradients`): :func:`lean_gradients`
runs it on a model, :func:`stacked_gradients` runs it under ``torch.vmap`` on ``K`` stacked
networks at once (:mod:`dhp_deploy.cohort`). On the CPU the DHP head and the cross-entropy run as
fused C++ kernels (:mod:`dhp_deploy.fused_head`) where they built.

Data-parallel (:mod:`dhp_deploy.distributed`): each rank passes its slice of the global batch and
the global batch size. The class sums and counts are all-reduced before the trace update, ``dW``
mid-backward (so ``dα``, ``dη`` and the class means' backward are the global batch's on every
rank), and the trunk's gradients at the end: three collectives per step, and every rank ends with
the one-process gradients up to rounding.
"""

from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from dhp_deploy import fused_head
from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.layer import DHPSoftmax, class_sums
from dhp_deploy.network import DHPNet, PlainHead

__all__ = ["supports_lean_step", "lean_gradients", "step_gradients", "stacked_gradients",
           "transformed_gradient_sums", "MULTIPLICATIVE"]

_ALL_CLASSES = torch.empty(0, dtype=torch.int64)  # the fused cross-entropy's "no task head"


def supports_lean_step(model: nn.Module) -> bool:
    r"""True for a :class:`DHPNet` whose trunk is Linear and ReLU layers only."""
    if not isinstance(model, DHPNet) or not isinstance(model.head, (DHPSoftmax, PlainHead)):
        return False
    layers = list(model.trunk)
    return (len(layers) % 2 == 0
            and all(isinstance(m, nn.Linear) for m in layers[0::2])
            and all(isinstance(m, nn.ReLU) for m in layers[1::2]))


def lean_gradients(model: DHPNet, x: Tensor, y: Tensor, head: Optional[Tensor],
                   targets: Tensor, replicas: Replicas = SINGLE,
                   batch_size: Optional[int] = None,
                   params: Optional[list] = None) -> tuple[dict, Tensor, Tensor, Tensor]:
    r"""One training forward and backward of ``model`` on ``(x, y)``, without autograd.

    ``head`` holds the task's class ids (multi-head: the loss covers those logits, ``targets``
    are positions within them) or is None (all classes, ``targets`` = ``y``). The DHP head's
    trace is updated (stored, as in a training forward). Returns ``(grads, loss, logits, hits)``:
    the gradient of the mean cross-entropy for every parameter (keyed by the parameter object's
    ``id``), the loss, the logits the loss used, and the number of correct predictions.

    Data-parallel, ``(x, y)`` is this rank's slice of a global batch of ``batch_size`` rows (one
    process: ``len(x)``, the default); the gradients are the global batch's, the loss and the hits
    this slice's share of them (their sums over the ranks are the global ones). ``params``:
    ``list(model.parameters())`` if the caller keeps it (listing them costs ~17 µs a step here).
    """
    params = list(model.parameters()) if params is None else params
    hebb = model.head.hebb if isinstance(model.head, DHPSoftmax) else None
    grads, loss, logits, hits = step_gradients(
        params, hebb, x, y, head, targets, len(x) if batch_size is None else batch_size,
        replicas, fused=fused_head.usable(x))
    return dict(zip(map(id, params), grads)), loss, logits, hits


def step_gradients(params: list, hebb: Optional[Tensor], x: Tensor, y: Tensor,
                   head: Optional[Tensor], targets: Tensor, batch_size: int,
                   replicas: Replicas = SINGLE, fused: bool = False):
    r""":func:`lean_gradients` on plain tensors: the maths alone, which ``torch.vmap`` also runs
    over a stack of networks (:func:`stacked_gradients`).

    ``params`` are a :class:`DHPNet`'s parameters in its own order: each trunk layer's weight and
    bias, then the head's ``w, alpha, eta`` (DHP, whose trace ``hebb`` is updated in place) or
    its weight (plain, ``hebb`` None). Returns the gradients in the same order, the loss, the
    logits the loss used and the hit count. ``fused``: the fused CPU kernels (the DHP head's and
    the cross-entropy's; not under vmap), and in one process the whole step as one C++ call
    (``csrc/lean_step.cpp``: from Python, its ~25 tensor calls took 14–16% longer at one thread).
    """
    if fused and fused_head.ONE_CALL_STEP and not replicas.distributed:  # one C++ call
        loss, logits, hits, *grads = fused_head.kernels().lean_step(
            params, hebb, x, y, _ALL_CLASSES if head is None else head, targets, batch_size)
        return grads, loss, logits, hits
    return python_step_gradients(params, hebb, x, y, head, targets, batch_size, replicas, fused)


def python_step_gradients(params: list, hebb: Optional[Tensor], x: Tensor, y: Tensor,
                          head: Optional[Tensor], targets: Tensor, batch_size: int,
                          replicas: Replicas = SINGLE, fused: bool = False):
    r""":func:`step_gradients` as Python code. With ``fused``, one process, the C++ step
    (``csrc/lean_step.cpp``) runs these same ATen ops in the same order, bit-identical; this
    code runs the data-parallel step, the step under ``vmap`` and the step without the kernels.
    """
    with torch.no_grad():
        weights, biases = _trunk_parameters(params, dhp=hebb is not None)
        activations = _trunk_forward(weights, biases, x)
        h = activations[-1]
        if hebb is None:
            logits_all, head_backward = _plain_head(params[-1], h)
        elif fused:
            logits_all, head_backward = _fused_dhp_head(*params[-3:], hebb, h, y, replicas)
        else:
            logits_all, head_backward = _dhp_head(*params[-3:], hebb, h, y, replicas)
        if fused:
            loss, dz, logits, hits = fused_head.kernels().cross_entropy(
                logits_all, _ALL_CLASSES if head is None else head, targets, batch_size)
        else:
            logits = logits_all if head is None else logits_all.index_select(1, head)
            loss, dlogits = _cross_entropy_and_gradient(logits, targets, batch_size)
            dz = dlogits if head is None else \
                torch.zeros_like(logits_all).index_copy(1, head, dlogits)  # vmap batches this
            hits = (logits.argmax(1) == targets).sum()
        dh, head_grads = head_backward(dz)
        trunk_grads = _trunk_backward(dh, weights, activations)
        if replicas.distributed:  # the DHP head's are already the global batch's gradients
            replicas.all_reduce_flat(trunk_grads if hebb is not None else
                                     trunk_grads + head_grads)
    return trunk_grads + head_grads, loss, logits, hits


def stacked_gradients(params: list, hebb: Optional[Tensor], x: Tensor, y: Tensor,
                      head: Optional[Tensor], targets: Tensor):
    r""":func:`step_gradients` of ``K`` networks at once, by ``torch.vmap``: every tensor but
    ``head`` has a leading dimension of ``K`` (networks, their traces, batches, targets). The
    maths is the one-network step's, batched (each matmul becomes one batched matmul); the traces
    are updated in place in the stacked ``hebb``. Returns stacked gradients, losses, logits, hits."""
    step = partial(step_gradients, batch_size=x.shape[1])
    in_dims = (0, None if hebb is None else 0, 0, 0, None, 0)
    return torch.vmap(step, in_dims=in_dims)(params, hebb, x, y, head, targets)


# Transforms with T(a·b) = T(a)·T(b): for them a per-sample gradient's transform sums in closed form.
MULTIPLICATIVE = (torch.square, torch.abs)


def transformed_gradient_sums(model: DHPNet, inputs: Tensor, classes: Optional[Tensor],
                              sample_loss, transform) -> list[Tensor]:
    r"""``Σ_k transform(∇_θ sample_loss(z_k))`` over the rows ``x_k`` of ``inputs``, for every slow
    weight θ of ``model`` in its parameter order (the trunk's weights and biases, then the head's
    θ), with ``z_k`` the logits in eval mode (the trace read, not updated), restricted to
    ``classes`` if given. What EWC's Fisher and MAS's importance need, without per-sample gradients.

    A sample's gradient of a linear map's weight is the outer product ``δ_k a_kᵀ`` of the signal at
    its output and its input, so for a ``transform`` in :data:`MULTIPLICATIVE` the sum over samples
    is one matmul, ``T(δ)ᵀ T(a)``, and a bias's is ``Σ_k T(δ_k)``: one batched forward and backward
    instead of one gradient per sample (1000 samples of a 784-256-256 net: ~1.4 s by ``vmap`` over
    ``grad`` on this repository's 2-core CPU). The signals at the logits come from autograd on the
    logits alone.
    """
    if transform not in MULTIPLICATIVE:
        raise ValueError(f"{transform} is not one of the multiplicative transforms")
    params = list(model.parameters())
    dhp = isinstance(model.head, DHPSoftmax)
    with torch.no_grad():
        weights, biases = _trunk_parameters(params, dhp)
        activations = _trunk_forward(weights, biases, inputs)
        h = activations[-1]
        head_weight = (torch.addcmul(model.head.w, model.head.alpha, model.head.hebb) if dhp
                       else model.head.linear.weight.t())  # (in, out)
        logits_all = h.matmul(head_weight)
        logits = logits_all if classes is None else logits_all.index_select(1, classes)
    # The rows' loss gradients by autograd, row by row (50 ms per 1000 rows; torch.func's vmap
    # would take 1 ms, after a 1.4 s first call that imports torch._dynamo).
    rows = logits.detach().requires_grad_()
    with torch.enable_grad():
        dz, = torch.autograd.grad(sum(sample_loss(row) for row in rows.unbind(0)), rows)
    with torch.no_grad():
        dz = dz if classes is None else torch.zeros_like(logits_all).index_copy(1, classes, dz)
        head_sum = transform(h).t().matmul(transform(dz))  # (in, out): θ's layout
        sums = [head_sum if dhp else head_sum.t()]
        dh = dz.matmul(head_weight.t())
    return _trunk_backward(dh, weights, activations, transform) + sums


def _trunk_parameters(params: list, dhp: bool) -> tuple[list, list]:
    r"""The trunk's weights and biases among a :class:`DHPNet`'s parameters (its own order)."""
    trunk = params[:-3] if dhp else params[:-1]  # the head's: w, alpha, eta or one weight
    return trunk[0::2], trunk[1::2]


def _trunk_forward(weights: list, biases: list, x: Tensor) -> list[Tensor]:
    r"""The trunk's input and every layer's output (Linear, then ReLU)."""
    activations = [x]
    for weight, bias in zip(weights, biases):
        activations.append(torch.addmm(bias, activations[-1], weight.t()).clamp_min_(0))
    return activations


def _trunk_backward(dh: Tensor, weights: list, activations: list,
                    transform=None) -> list[Tensor]:
    r"""Every trunk layer's weight and bias gradients, first layer first, from ``dh`` at the
    trunk's output; with a multiplicative ``transform``, the sums over rows of the transformed
    per-row gradients instead (``T(δ)ᵀ T(a)``, :func:`transformed_gradient_sums`)."""
    grads = []
    for index in range(len(weights) - 1, -1, -1):
        # ReLU's backward, as autograd computes it: the gradient where the output is > 0.
        da = torch.ops.aten.threshold_backward(dh, activations[index + 1], 0)
        signal, inputs = ((da, activations[index]) if transform is None
                          else (transform(da), transform(activations[index])))
        grads[:0] = [signal.t().matmul(inputs), signal.sum(0)]
        if index > 0:  # the input needs no gradient
            dh = da.matmul(weights[index])
    return grads


def _dhp_head(w: Tensor, alpha: Tensor, eta: Tensor, old: Tensor, h: Tensor, y: Tensor,
              replicas: Replicas):
    r"""The DHP head's training forward (trace ``old`` updated in place by the backward) and a
    closure for its backward; gradients for ``w, alpha, eta`` in that order.

    Data-parallel, the class statistics and ``dW`` are all-reduced: the trace update and the head's
    gradients are the global batch's on every rank.
    """
    sums, counts = class_sums(h, y, w.shape[1])
    if replicas.distributed:  # one collective for both: [sums | counts]
        stats = replicas.all_reduce(torch.cat([sums, counts.unsqueeze(1)], dim=1))
        sums, counts = stats[:, :-1], stats[:, -1]
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    present = (counts > 0).to(h.dtype)
    rate = eta * present  # η for the classes in the batch, 0 for the others
    means_t = means.t()
    hebb = torch.lerp(old, means_t, rate)
    # W_eff is stored (in, out) like θ; its (out, in) copy feeds the matmuls, and dW is computed
    # (out, in): in that layout this CPU's kernels ran the three 64×256×10 products in 60 µs
    # instead of 132 µs, and the whole head's forward + backward in 250 µs instead of 290 µs.
    effective = torch.addcmul(w, alpha, hebb)
    effective_t = effective.t().contiguous()
    logits = h.matmul(effective_t.t())

    def backward(dz: Tensor):
        d_effective = replicas.all_reduce(dz.t().matmul(h)).t()  # (in, out), a view
        d_hebb = d_effective * alpha
        d_eta = (d_hebb * (means_t - old)).matmul(present).sum().reshape(1)
        d_means = (d_hebb * rate).t().div_(counts.clamp_min(1.0).unsqueeze(1))
        dh = dz.matmul(effective_t).add_(d_means.index_select(0, y))
        # The stored trace, as the layer's training forward leaves it, written into the same
        # buffer once dη no longer needs the old one: a step replayed as a CUDA graph
        # (dhp_deploy.cuda_graph) reads and writes the trace at one fixed address.
        old.copy_(hebb)
        return dh, [d_effective, d_effective * hebb, d_eta]

    return logits, backward


def _fused_dhp_head(w: Tensor, alpha: Tensor, eta: Tensor, old: Tensor, h: Tensor, y: Tensor,
                    replicas: Replicas):
    r""":func:`_dhp_head` by the fused CPU kernels (:mod:`dhp_deploy.fused_head`): the same maths
    and collectives."""
    kernels = fused_head.kernels()
    stats = replicas.all_reduce(kernels.class_stats(h, y, w.shape[1]))  # [sums | counts]
    logits, hebb, *saved = kernels.head_forward(h, stats, w, alpha, eta, old)

    def backward(dz: Tensor):
        d_effective_t = replicas.all_reduce(dz.t().matmul(h))  # (out, in)
        dh, d_alpha, d_eta = kernels.head_backward(dz, y, d_effective_t, alpha, hebb, *saved)
        old.copy_(hebb)  # as the eager head: the stored trace keeps its buffer
        return dh, [d_effective_t.t(), d_alpha, d_eta]

    return logits, backward


def _plain_head(weight: Tensor, h: Tensor):
    logits = h.matmul(weight.t())

    def backward(dz: Tensor):
        return dz.matmul(weight), [dz.t().matmul(h)]

    return logits, backward


def _cross_entropy_and_gradient(logits: Tensor, targets: Tensor,
                                batch_size: int) -> tuple[Tensor, Tensor]:
    r"""The rows' cross-entropy summed and divided by ``batch_size`` (their share of the global
    batch's mean), and its gradient with respect to ``logits``: (softmax − onehot) / batch_size."""
    # gather/scatter rather than log_probs[rows, targets]: the same values, half the time
    # (76 → 37 µs at batch 64: advanced indexing is the slow path for small tensors).
    log_probs = torch.log_softmax(logits, dim=1)
    columns = targets.unsqueeze(1)
    picked = log_probs.gather(1, columns)
    loss = picked.sum().neg_().div_(batch_size)
    gradient = log_probs.exp_().scatter_add_(1, columns, torch.full_like(picked, -1.0))
    return loss, gradient.div_(batch_size)
