r"""The Differentiable Hebbian Plasticity softmax layer (DHP-Softmax).

Each synapse from hidden unit i to class j has a slow weight ``w[i, j]`` (θ), a learned plasticity
coefficient ``alpha[i, j]`` (α) and a fast Hebbian trace ``hebb[i, j]``; one learned scalar ``eta``
(η) sets how fast the trace moves. In training, a batch first moves each present class's trace
column towards the mean activation of that class's rows, then the logits use the updated trace:

    Hebb[:, c] ← (1 − η)·Hebb[:, c] + η·mean(h[y == c])      for every class c in y
    z = h · (θ + α ⊙ Hebb)

This is Algorithm 1 of "Enabling Continual Learning with
Differentiable Hebbian Plasticity" (IJCNN 2020), computed without a Python loop over classes.
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import init

__all__ = ["DHPSoftmax", "algorithm1_step", "WEIGHT_INITS", "init_slow_weights_", "class_sums", "class_means",
           "hebbian_update", "dhp_logits"]

# How θ, stored (in_features, out_features), is initialised:
# - "authors": the DHP authors' literal code, ``init.kaiming_uniform_(w, a=math.sqrt(5))`` on the
#   (in, out)-shaped tensor. PyTorch takes fan_in from dimension 1, so the bound is
#   ``1/√out_features`` (0.316 for 10 classes): five times nn.Linear's for a 256-wide input.
# - "linear": :class:`torch.nn.Linear`'s bound ``1/√in_features`` (0.0625 for 256 inputs).
WEIGHT_INITS = ("authors", "linear")


def init_slow_weights_(w: Tensor, scheme: str) -> Tensor:
    r"""Fill the ``(in_features, out_features)`` slow weights ``w`` in place by ``scheme``.

    Both schemes draw one uniform sample per entry from the global generator, in the same order,
    so only the bound differs between them.
    """
    if scheme == "authors":
        return init.kaiming_uniform_(w, a=math.sqrt(5))
    if scheme == "linear":
        bound = 1.0 / math.sqrt(w.shape[0]) if w.shape[0] > 0 else 0.0
        return init.uniform_(w, -bound, bound)
    raise ValueError(f"unknown weight init {scheme!r}, expected one of {', '.join(WEIGHT_INITS)}")


def class_sums(h: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    r"""Per-class sums of the rows of ``h`` ``(num_classes, in_features)`` and class counts."""
    sums = torch.zeros(num_classes, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, y, h)
    ones = torch.ones(y.shape[0], dtype=h.dtype, device=h.device)
    counts = torch.zeros(num_classes, dtype=h.dtype, device=h.device).index_add(0, y, ones)
    return sums, counts


def class_means(h: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    r"""Per-class mean rows of ``h`` ``(num_classes, in_features)`` and class counts, by ``index_add``.

    Absent classes get a zero mean (the count is clamped to 1 only to avoid 0/0).
    """
    sums, counts = class_sums(h, y, num_classes)
    return sums / counts.clamp_min(1.0).unsqueeze(1), counts


def hebbian_update(hebb: Tensor, h: Tensor, y: Tensor, eta: Tensor) -> Tensor:
    r"""One step of the Hebbian trace update, as a fresh tensor (differentiable in ``h``, ``eta``).

    Vectorised Algorithm 1: per-class means by ``index_add``, then one ``lerp`` whose weight is η
    for the classes present and 0 for the others, so absent classes keep their column exactly
    (``H + 0·(M − H) = H``). Shapes stay static and nothing is read back to the host, so the step is
    scriptable and sync-free on CUDA. ``H + η(M − H)`` is Algorithm 1's ``(1 − η)H + ηM`` up to
    float rounding.

    Args:
        hebb: current trace, ``(in_features, out_features)``.
        h: activations, ``(B, in_features)``.
        y: class ids, int64 ``(B,)``, each in ``[0, out_features)`` (not checked here).
        eta: plasticity rate, shape ``(1,)``.
    """
    means, counts = class_means(h, y, hebb.shape[1])
    return torch.lerp(hebb, means.t(), eta * (counts > 0))


def dhp_logits(h: Tensor, w: Tensor, alpha: Tensor, hebb: Tensor) -> Tensor:
    r"""``z = h · (θ + α ⊙ Hebb)``."""
    return h.matmul(torch.addcmul(w, alpha, hebb))


class DHPSoftmax(nn.Module):
    r"""Output layer with slow weights plus a Hebbian fast-weight trace (DHP-Softmax).

    Args:
        in_features: width of the penultimate activations ``h``.
        out_features: number of classes.
        eta_init: initial plasticity rate η. Default 0.01, the value used by differentiable
            plasticity (ICML 2018), which DHP builds on: the trace then averages
            roughly the last 100 batches of each class, slow enough that one batch cannot overwrite
            what earlier tasks left in it. η is learned.
        alpha_scale: α starts as ``alpha_scale · U[0, 1)`` (the authors' 0.01), so the layer begins
            almost as a plain linear softmax and learns how much plasticity each synapse uses.
        weight_init: how θ is initialised, one of :data:`WEIGHT_INITS`. Default ``"authors"``, the
            DHP authors' code: bound ``1/√out_features``. ``"linear"`` is :class:`torch.nn.Linear`'s
            bound ``1/√in_features``. The choice matters: on Split MNIST the wider bound alone
            changes a plain network's accuracy by points (docs/RESULTS.md, ablation).
        device, dtype: factory arguments, as in :class:`torch.nn.Linear`.

    Attributes:
        w: slow weights θ, ``(in_features, out_features)``, uniform in ``±bound`` by ``weight_init``.
        alpha: plasticity coefficients α, ``(in_features, out_features)``.
        eta: plasticity rate η, ``(1,)``.
        hebb: the Hebbian trace, a persistent buffer (saved in ``state_dict``, moved by ``.to()``),
            never a parameter; it is stored detached so no autograd graph survives a step.

    Shape:
        - h: ``(B, in_features)``; y: int64 ``(B,)`` class ids.
        - output: ``(B, out_features)`` logits.

    ``forward(h, y)`` in training mode updates the trace with ``y`` and returns logits computed with
    the updated trace; in eval mode, or when ``y`` is None, it returns logits with the current trace
    and leaves it unchanged. Gradients flow into ``w``, ``alpha``, ``eta`` (through this step's
    update) and ``h`` (through the matmul and the class means), as in the authors' code.

    What the module checks: the shapes of ``h`` and ``y`` and the dtype of ``y`` (metadata only, no
    device sync). It checks the *range* of ``y`` only for CPU tensors. On CUDA an out-of-range label
    would be a device-side assert that kills the process, and checking it here would cost a host
    sync every step, so labels must be validated where the data enters (``dhp_deploy.data``
    validates every label once when a benchmark is built).

    Examples::

        >>> layer = DHPSoftmax(256, 10)
        >>> logits = layer(torch.randn(64, 256), torch.randint(0, 10, (64,)))
        >>> logits.shape
        torch.Size([64, 10])
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, eta_init: float = 0.01,
                 alpha_scale: float = 0.01, weight_init: str = "authors", device=None,
                 dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eta_init = eta_init
        self.alpha_scale = alpha_scale
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight_init {weight_init!r}, expected one of "
                             f"{', '.join(WEIGHT_INITS)}")
        self.weight_init = weight_init
        self.w = nn.Parameter(torch.empty(in_features, out_features, **factory))
        self.alpha = nn.Parameter(torch.empty(in_features, out_features, **factory))
        self.eta = nn.Parameter(torch.empty(1, **factory))
        self.register_buffer("hebb", torch.zeros(in_features, out_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_slow_weights_(self.w, self.weight_init)
        with torch.no_grad():
            self.alpha.uniform_(0.0, 1.0).mul_(self.alpha_scale)
            self.eta.fill_(self.eta_init)
        self.reset_trace()

    def reset_trace(self) -> None:
        r"""Zero the Hebbian trace (done at construction; the trace is *not* reset between tasks)."""
        self.hebb.zero_()

    def forward(self, h: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self._check_inputs(h, y)
        if not self.training or y is None:
            return dhp_logits(h, self.w, self.alpha, self.hebb)
        hebb = hebbian_update(self.hebb, h, y, self.eta)
        # Store detached: the trace carries values, never a graph, into the next step. A fresh
        # tensor, not an in-place write: autograd still needs the old trace for dL/dη.
        self.hebb = hebb.detach()
        return dhp_logits(h, self.w, self.alpha, hebb)

    @torch.no_grad()
    def plasticity_summary(self) -> dict:
        r"""How much plasticity the layer uses: mean |α|, η, and ‖α ⊙ Hebb‖ / ‖θ‖ (Frobenius)."""
        plastic = torch.linalg.vector_norm(self.alpha * self.hebb)
        slow = torch.linalg.vector_norm(self.w)
        return {"mean_abs_alpha": self.alpha.abs().mean().item(), "eta": self.eta.item(),
                "plastic_to_slow": (plastic / slow).item() if slow > 0 else float("nan")}

    def _check_inputs(self, h: Tensor, y: Optional[Tensor]) -> None:
        if h.dim() != 2 or h.shape[1] != self.in_features:
            raise ValueError(f"DHPSoftmax: h must have shape (B, {self.in_features}), "
                             f"got {list(h.shape)}")
        if y is None:
            return
        if y.dtype != torch.int64:
            raise TypeError(f"DHPSoftmax: labels y must be int64 class ids, got {y.dtype}")
        if y.dim() != 1 or y.shape[0] != h.shape[0]:
            raise ValueError(f"DHPSoftmax: labels y must have shape ({h.shape[0]},), "
                             f"got {list(y.shape)}")
        if y.device.type == "cpu" and y.numel() > 0:
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.out_features:
                raise ValueError(f"DHPSoftmax: labels must be in [0, {self.out_features}), "
                                 f"got values in [{low}, {high}]")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_init={self.weight_init}")


def algorithm1_step(hebb: Tensor, h: Tensor, y: Tensor, eta, w: Tensor, alpha: Tensor):
    r"""The authors' Algorithm 1, literally: one training step of DHP-Softmax with a Python loop
    over the classes present in the batch. The reference the layer, the fused kernels and the
    exported models are tested against, and the baseline of benchmarks/bench_layer.py.

    Returns the logits and the updated trace (still attached to the graph).
    """
    columns = list(hebb.unbind(dim=1))  # a list, not in-place writes: autograd needs the old values
    for c in torch.unique(y).tolist():
        class_mean = h[y == c].mean(dim=0)
        columns[c] = (1 - eta) * columns[c] + eta * class_mean
    hebb = torch.stack(columns, dim=1)
    return h @ (w + alpha * hebb), hebb
