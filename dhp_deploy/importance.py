r"""What the regularisers measure on a network: its slow weights (every parameter but the DHP
layers' α and η) as one flat vector, views of it per parameter, and the mean over samples of a
transformed per-sample gradient (the Fisher of EWC, the importances of MAS)."""

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.lean_step import MULTIPLICATIVE, supports_lean_step, transformed_gradient_sums
from dhp_deploy.network import plastic_parameters, task_logits

__all__ = ["slow_parameters", "flat_slow_weights", "parameter_views", "StepViews",
           "detached_slow_weights", "sample_subset", "mean_per_sample_gradient"]

# Per-sample gradients are computed this many samples at a time (memory ~ chunk × #slow weights).
PER_SAMPLE_CHUNK = 64
# Rows per batched pass of the closed form (memory ~ chunk × the widest layer).
CLOSED_FORM_CHUNK = 4096


def slow_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    r"""The parameters consolidation acts on: all but the DHP layers' α and η."""
    plastic = {id(p) for p in plastic_parameters(model)}
    return {name: p for name, p in model.named_parameters() if id(p) not in plastic}


def flat_slow_weights(model: nn.Module) -> Tensor:
    r"""The slow weights as one 1-D tensor (differentiable: gradients reach the parameters)."""
    return torch.cat([p.reshape(-1) for p in slow_parameters(model).values()])


def parameter_views(flat: Tensor, params: list) -> list[Tensor]:
    # Views of a flat slow-weight vector, shaped like each parameter (no copy).
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]


class StepViews:
    r"""The slow parameters of one model and per-parameter views of flat state vectors, kept from
    one step to the next: the lean step calls a regulariser every step, and rebuilding these
    lists took ~35 µs a call. A view is remade when its role's tensor is replaced."""

    def __init__(self) -> None:
        self.model, self.params, self.views = None, [], {}

    def parameters(self, model: nn.Module) -> list:
        if model is not self.model:
            self.model, self.params, self.views = model, list(slow_parameters(model).values()), {}
        return self.params

    def of(self, model: nn.Module, role: str, flat: Tensor) -> list[Tensor]:
        params = self.parameters(model)
        if role not in self.views or self.views[role][0] is not flat:
            self.views[role] = (flat, parameter_views(flat, params))
        return self.views[role][1]


def detached_slow_weights(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return flat_slow_weights(model).detach().clone()


def sample_subset(inputs: Tensor, count: int, generator: torch.Generator) -> Tensor:
    r"""At most ``count`` rows of ``inputs``, chosen by one ``randperm`` of ``generator`` (CPU)."""
    if len(inputs) <= count:
        return inputs
    order = torch.randperm(len(inputs), generator=generator)[:count]
    return inputs[order.to(inputs.device)]


def mean_per_sample_gradient(model: nn.Module, inputs: Tensor, classes: Optional[Tensor],
                             sample_loss: Callable[[Tensor], Tensor],
                             transform: Callable[[Tensor], Tensor],
                             replicas: Replicas = SINGLE) -> Tensor:
    r"""``mean_k transform(∇_θ sample_loss(logits(x_k)))`` over the rows of ``inputs``, flat.

    For the networks the lean step trains and a square or abs ``transform``, in closed form
    (:func:`dhp_deploy.lean_step.transformed_gradient_sums`: one batched backward). Otherwise
    per-sample gradients come from ``torch.func`` (``vmap`` over ``grad``) with respect to the slow
    weights only. The model runs in eval mode, so the DHP head uses its current trace and does not
    update it; the previous mode is restored afterwards. ``classes`` restricts the logits to one
    task's head (task-incremental), ``None`` keeps all of them. Data-parallel, each rank sums
    over its shard of ``inputs`` and the sums are all-reduced. No rows (a 0-row call, or a rank
    whose shard is empty when there are fewer samples than ranks) sum to zeros, and every rank
    still joins the all-reduce.
    """
    total = torch.zeros(sum(p.numel() for p in slow_parameters(model).values()),
                        dtype=inputs.dtype, device=inputs.device)
    shard = replicas.shard(inputs)
    if len(shard) == 0:  # neither path takes 0 rows: autograd of an empty sum, vmap of size 0
        return replicas.all_reduce(total) / max(len(inputs), 1)
    if transform in MULTIPLICATIVE and supports_lean_step(model):  # the same sums, in closed form
        for chunk in shard.split(CLOSED_FORM_CHUNK):
            total += torch.cat([part.reshape(-1) for part in transformed_gradient_sums(
                model, chunk, classes, sample_loss, transform)])
        return replicas.all_reduce(total) / max(len(inputs), 1)
    was_training = model.training
    model.eval()
    try:
        slow = {name: p.detach() for name, p in slow_parameters(model).items()}
        fixed = {name: p.detach() for name, p in model.named_parameters() if name not in slow}
        fixed.update({name: b.detach() for name, b in model.named_buffers()})

        def loss_of_one(slow_weights, x):
            logits = functional_call(model, {**slow_weights, **fixed}, (x.unsqueeze(0),))
            if classes is not None:
                logits = task_logits(logits, classes)
            return sample_loss(logits[0])

        per_sample_grads = vmap(grad(loss_of_one), in_dims=(None, 0))
        for chunk in shard.split(PER_SAMPLE_CHUNK):
            grads = per_sample_grads(slow, chunk)
            flat = torch.cat([g.reshape(len(chunk), -1) for g in grads.values()], dim=1)
            total += transform(flat).sum(0)
        return replicas.all_reduce(total) / max(len(inputs), 1)
    finally:
        model.train(was_training)
