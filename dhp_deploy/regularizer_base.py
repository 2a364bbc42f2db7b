r"""What a consolidation regulariser is: the hooks the training loop calls, the registry, and the
quadratic-anchor state the penalties share (the methods themselves: :mod:`dhp_deploy.regularizers`).

Every regulariser subclasses :class:`Regularizer` and overrides the hooks it needs, called by the
training loop (the steps, :mod:`dhp_deploy.steps`; a task's start and end,
:class:`dhp_deploy.train.TrainingRun`):

- ``before_task(model)``: a task is about to start (SI records where the weights start).
- ``penalty(model)``: the consolidation term added to the task loss, ``loss = ce + penalty``, so its
  gradient comes from autograd. Returns the float ``0.0`` while there is nothing to consolidate yet
  (the first task), so that task's step does no extra work.
- ``after_step(model)``: after ``optimizer.step()`` (SI's path integral).
- For the lean step (:mod:`dhp_deploy.lean_step`, no autograd): ``gradients_with_penalty(model,
  grads)``, the task's gradients plus the penalty's closed-form gradient, and, after a plain-SGD
  update ``θ ← θ − lr·g`` (no momentum), ``after_sgd_step(model, task_grads, lr)`` in place of
  ``after_step``: SI then knows its step exactly and needs one pass over the weights, not five.
  ``penalised_sgd(model, grads, lr)`` is that update with the penalty's gradient: the quadratic
  penalties do both in one fused pass over the weights where the CPU kernels built.
- ``after_task(model, inputs, classes, generator, replicas)``: the task is learned; estimate
  importances on at most ``fisher_samples`` of its training ``inputs`` (a subset drawn with
  ``generator``) and anchor. Data-parallel, each rank takes its shard of that subset and the sums
  are all-reduced (``replicas``, :mod:`dhp_deploy.distributed`): every rank gets the one-process
  importances. SI needs no collective: its path integral uses the all-reduced gradients.
- ``state_dict()`` / ``load_state_dict(state)``: tensors, lists and numbers only, so checkpoints
  load with ``weights_only=True`` and a resumed run continues bit for bit.

"Slow weights" are every parameter except the DHP layers' plasticity ``alpha`` and ``eta``. The
parameters are handled as one flat vector (their ``named_parameters`` order), so a penalty is a
handful of autograd ops however many layers or tasks there are.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from dhp_deploy import fused_head
from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.importance import StepViews, parameter_views, slow_parameters

__all__ = ["Option", "REGISTRY", "OPTIONS", "register", "Regularizer", "QuadraticAnchors"]


@dataclass(frozen=True)
class Option:
    r"""A regulariser's hyperparameter (a ``TrainConfig`` field and a ``dhp-train`` option of
    the same name): its default, its help text and its valid range (``value > low`` where
    ``low_open``, else ``value >= low``; at most ``high``)."""

    default: float
    help: str
    low: float = 0.0
    high: Optional[float] = None
    low_open: bool = False
    integer: bool = False


REGISTRY: dict = {}  # method name → its Regularizer class, in the order they were declared
OPTIONS: dict = {}  # every registered option, by name


def register(cls):
    r"""Class decorator: make ``cls`` a method of ``dhp-train``, the reproduction's grids and
    searches, and the benchmarks, under ``cls.name``. An option it shares with another method
    must be the same :class:`Option` object."""
    for name, option in cls.options.items():
        if OPTIONS.setdefault(name, option) is not option:
            raise ValueError(f"{cls.__name__}: option {name!r} is declared twice, differently")
    if cls.strength_option is not None and cls.strength_option not in cls.options:
        raise ValueError(f"{cls.__name__}: strength option {cls.strength_option!r} is not one of "
                         f"its options")
    REGISTRY[cls.name] = cls
    return cls


class Regularizer:
    r"""The interface the training loop calls; every hook is a no-op here (no consolidation).

    ``max_curvature()`` is the largest diagonal entry of the penalty's Hessian (0 while there is no
    penalty). Plain SGD with learning rate ``lr`` and momentum ``μ`` is unstable on the penalty
    once ``lr · max_curvature > 2(1 + μ)``; the cross-entropy only adds curvature, so the training
    loop checks this bound before a task starts instead of discovering NaNs later.
    """

    # What a method declares (see :func:`register`): its name on the command line, its name in
    # reports, its options, the one that sets its strength, the values a strength search tries,
    # and the value that search chose per benchmark under the paper's protocol (dhp-train's
    # default there; docs/results/strengths.json, which a test keeps equal).
    name: str = ""
    display: str = ""
    options: dict = {}
    strength_option: Optional[str] = None
    search_values: tuple = ()
    searched: dict = {}

    @classmethod
    def from_options(cls, values: dict) -> "Regularizer":
        r"""The regulariser with ``values[name]`` for each of its options."""
        return cls(**{name: values[name] for name in cls.options})

    def before_task(self, model: nn.Module) -> None:
        pass

    def penalty(self, model: nn.Module):
        return 0.0

    def after_step(self, model: nn.Module) -> None:
        pass

    def after_task(self, model, inputs, classes, generator, replicas: Replicas = SINGLE) -> None:
        pass

    def after_sgd_step(self, model: nn.Module, task_grads: dict, lr: float) -> None:
        r"""After the lean step's plain-SGD update with the task gradients ``task_grads``
        (``{id(parameter): tensor}``) plus the penalty's (left in each ``.grad``)."""
        self.after_step(model)

    def gradients_with_penalty(self, model: nn.Module, grads: dict) -> dict:
        r"""The task gradients ``grads`` (``{id(parameter): tensor}``, left unchanged) plus the
        penalty's gradient; for the lean step, which runs without autograd.

        Here by autograd of :meth:`penalty`, so a method that defines only its penalty is right
        on the lean path too (just slower); the built-in methods override this with closed forms.
        """
        with torch.enable_grad():
            penalty = self.penalty(model)
            if not isinstance(penalty, Tensor) or not penalty.requires_grad:
                return grads  # no penalty (yet): nothing to add
            params = [p for p in model.parameters() if p.requires_grad]
            extra = torch.autograd.grad(penalty, params, allow_unused=True)
        return {**grads, **{id(p): grads[id(p)] + g for p, g in zip(params, extra)
                            if g is not None}}

    def penalised_sgd(self, model: nn.Module, grads: dict, lr: float) -> tuple[dict, frozenset]:
        r"""``(totals, updated)``: the task gradients ``grads`` plus the penalty's, as
        :meth:`gradients_with_penalty`, and the ids of the parameters this call already moved by
        ``−lr·total`` (none here: the caller's plain-SGD update moves them all)."""
        return self.gradients_with_penalty(model, grads), frozenset()

    def max_curvature(self) -> float:
        return 0.0

    @property
    def strength(self) -> float:
        return getattr(self, self.strength_option) if self.strength_option else 0.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class QuadraticAnchors(Regularizer):
    r"""Shared state of the quadratic penalties ``Σ_t Σ_i importance_t,i · (θ_i − anchor_t,i)²``.

    ``importances`` and ``anchors`` are ``(num_anchors, num_slow_weights)`` tensors, one row per
    consolidated task (or a single running row). The penalty is computed from one merged row,
    ``Σ_t F_t (θ − a_t)² = F (θ − ā)² + Σ_t F_t (a_t − ā)²`` with ``F = Σ_t F_t`` and
    ``ā = Σ_t F_t a_t / F`` (the cross terms cancel), so a training step costs the same for any
    number of tasks: with 4 anchors the per-row form took 4.7x longer. The penalty is
    ``penalty_scale · strength · Σ``.
    """

    penalty_scale = 1.0  # EWC's ½

    def __init__(self) -> None:
        self.importances: Optional[Tensor] = None
        self.anchors: Optional[Tensor] = None
        self._merged: Optional[tuple[Tensor, Tensor, float]] = None
        self._curvature: Optional[tuple[float, Tensor]] = None  # (strength, 2·scale·strength·F)
        self._views = StepViews()

    def penalty(self, model: nn.Module):
        return self.quadratic_penalty(model, self.penalty_scale * self.strength)

    @torch.no_grad()
    def gradients_with_penalty(self, model: nn.Module, grads: dict) -> dict:
        # g + 2·scale·strength·F ⊙ (θ − θ*): two passes over the weights.
        if self._merged is None:
            return grads
        params = self._views.parameters(model)
        offsets = torch._foreach_sub(params, self._views.of(model, "anchor", self._merged[1]))
        totals = torch._foreach_addcmul([grads[id(p)] for p in params],
                                        self._views.of(model, "curvature", self._curvature_row()),
                                        offsets)
        return {**grads, **{id(p): total for p, total in zip(params, totals)}}

    def _curvature_row(self) -> Tensor:
        # 2·scale·strength·F, kept from one step to the next (it changes only with the anchor or
        # the strength).
        if self._curvature is None or self._curvature[0] != self.strength:
            self._curvature = (self.strength,
                               self._merged[0] * (2 * self.penalty_scale * self.strength))
        return self._curvature[1]

    @torch.no_grad()
    def penalised_sgd(self, model: nn.Module, grads: dict, lr: float) -> tuple[dict, frozenset]:
        # Penalty gradient and update in one pass (csrc/penalised_sgd.cpp): the same fused
        # multiply-adds as the torch ops, 6 array passes instead of 10.
        params = self._views.parameters(model)
        if (self._merged is None or not fused_head.penalty_usable(params)
                or self._merged[0].dtype != params[0].dtype):
            return super().penalised_sgd(model, grads, lr)
        anchor = self._merged[1]
        totals = fused_head.kernels().penalised_sgd(
            params, [grads[id(p)] for p in params],
            self._views.of(model, "curvature", self._curvature_row()),
            self._views.of(model, "anchor", anchor), lr, self._fused_path_integral(model))
        return ({**grads, **{id(p): total for p, total in zip(params, totals)}},
                frozenset(id(p) for p in params))

    def _fused_path_integral(self, model: nn.Module) -> list:
        r"""Per slow parameter, a path integral the penalised-SGD kernel adds ``lr·g·total`` to
        in the same pass (SI's); none here."""
        return []

    def max_curvature(self) -> float:
        if self._merged is None:
            return 0.0
        return 2 * self.penalty_scale * self.strength * self._merged[0].max().item()

    def state_dict(self) -> dict:
        return self.anchor_state()

    def load_state_dict(self, state: dict) -> None:
        self.load_anchor_state(state)

    def quadratic_penalty(self, model: nn.Module, strength: float):
        if self._merged is None:
            return 0.0
        importance, anchor, offset = self._merged
        # Parameter by parameter on views of the flat rows: no concatenated copy of the weights
        # (and no split of its gradient), 40% cheaper per step than the flat form.
        params = list(slow_parameters(model).values())
        total = offset
        for param, weight, center in zip(params, parameter_views(importance, params),
                                         parameter_views(anchor, params)):
            total = total + (weight * (param - center).square()).sum()
        return strength * total

    def add_anchor(self, importance: Tensor, anchor: Tensor, keep_previous: bool = True) -> None:
        if self.anchors is None or not keep_previous:
            self.importances, self.anchors = importance[None], anchor[None]
        else:
            self.importances = torch.cat([self.importances, importance[None]])
            self.anchors = torch.cat([self.anchors, anchor[None]])
        self._merge_rows()

    def _merge_rows(self) -> None:
        self._curvature = None
        if self.anchors is None:
            self._merged = None
        elif len(self.anchors) == 1:  # exactly the stored row: the penalty is 0 at the anchor
            self._merged = (self.importances[0], self.anchors[0], 0.0)
        else:
            total = self.importances.sum(0)
            weighted = (self.importances * self.anchors).sum(0)
            # Where every F_t is 0 the merged anchor is irrelevant (its weight is 0).
            anchor = torch.where(total > 0, weighted / total.clamp_min(1e-30), self.anchors[-1])
            spread = self.importances.double() * (self.anchors.double() - anchor.double()).square()
            self._merged = (total, anchor, spread.sum().item())

    def anchor_state(self) -> dict:
        return {"importances": self.importances, "anchors": self.anchors}

    def load_anchor_state(self, state: dict) -> None:
        self.importances, self.anchors = state["importances"], state["anchors"]
        self._merge_rows()
