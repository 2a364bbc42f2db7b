r"""Consolidation regularisers: one small class per method, acting on slow weights only, each
declared once (:func:`~dhp_deploy.regularizer_base.register`) with its name, options and searched
strengths; the hooks they override are described in :mod:`dhp_deploy.regularizer_base`.

Defaults are tuned for the 784-256-256 MLPs of the MNIST benchmarks trained with SGD lr 0.01; tune
them for another protocol on a validation split (``--val-fraction``), never on test data.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from dhp_deploy.distributed import SINGLE, Replicas
from dhp_deploy.importance import (detached_slow_weights, mean_per_sample_gradient,
                                   parameter_views, sample_subset, slow_parameters)
# The declaration API, importable from here, where a new method is written beside the others.
from dhp_deploy.regularizer_base import (OPTIONS, REGISTRY, Option, QuadraticAnchors, Regularizer,
                                         register)

__all__ = ["METHODS", "DEFAULTS", "STRENGTH_OPTION", "SEARCHED_STRENGTHS", "build_regularizer",
           "Option", "REGISTRY", "OPTIONS", "register", "Regularizer", "Finetune", "OnlineEWC",
           "ElasticWeightConsolidation", "SynapticIntelligence", "MemoryAwareSynapses"]

# Options that several methods take, declared once.
EWC_LAMBDA = Option(1000.0, "EWC / Online EWC strength.")
FISHER_SAMPLES = Option(1000, "Training samples per Fisher / MAS importance estimate.", low=1,
                        integer=True)


@register
class Finetune(Regularizer):
    r"""No consolidation: plain sequential fine-tuning (the lower baseline)."""

    name, display = "finetune", "Finetune"


def _predicted_label_nll(logits: Tensor) -> Tensor:
    # −log p(ŷ | x) for the model's own prediction ŷ = argmax: the max of the log-softmax.
    return -torch.log_softmax(logits, dim=0).max()


@register
class ElasticWeightConsolidation(QuadraticAnchors):
    r"""EWC (Kirkpatrick et al., PNAS 2017) and Online EWC (Schwarz et al., ICML 2018).

    Penalty ``(ewc_lambda / 2) · Σ_t Σ_i F_t,i · (θ_i − θ*_t,i)²`` over the slow weights.

    After each task, the diagonal Fisher ``F_i = mean_k (∂ log p(ŷ_k | x_k) / ∂θ_i)²`` is estimated
    from per-sample gradients of at most ``fisher_samples`` of the task's training inputs, in eval
    mode (the DHP trace does not move), using the model's own predicted label ``ŷ_k = argmax``
    (not the true label), within the task's head in the task-incremental scenario. This is
    van de Ven's ``continual_learner.py`` default.

    One code path for both methods, differing by ``online_gamma`` (as in van de Ven):

    - ``online_gamma=None`` (EWC): one anchor θ*_t and one Fisher F_t per task, summed.
    - ``online_gamma=γ`` (Online EWC): one running Fisher ``F ← γ·F + F_new`` and the latest anchor.

    Args:
        ewc_lambda: penalty strength. Default 1000: with a per-sample Fisher (entries ~1e-6..1e-2 on
            MNIST MLPs) values in the 100s–1000s protect earlier tasks without freezing the net.
        online_gamma: decay of the running Fisher; None for classic EWC. Online EWC default 1.0.
        fisher_samples: training samples per Fisher estimate (bounded so it stays fast on CPU).
    """

    name, display, penalty_scale = "ewc", "EWC", 0.5
    options = {"ewc_lambda": EWC_LAMBDA, "fisher_samples": FISHER_SAMPLES}
    strength_option, search_values = "ewc_lambda", (100.0, 1000.0, 10000.0)
    searched = {"split-mnist": 10000.0, "split-fashion-mnist": 10000.0,
                "permuted-mnist": 100.0, "imbalanced-permuted-mnist": 100.0}

    def __init__(self, ewc_lambda: float = EWC_LAMBDA.default,
                 online_gamma: Optional[float] = None,
                 fisher_samples: int = FISHER_SAMPLES.default) -> None:
        super().__init__()
        self.ewc_lambda = ewc_lambda
        self.online_gamma = online_gamma
        self.fisher_samples = fisher_samples

    def after_task(self, model, inputs, classes, generator, replicas: Replicas = SINGLE) -> None:
        samples = sample_subset(inputs, self.fisher_samples, generator)
        fisher = mean_per_sample_gradient(model, samples, classes, _predicted_label_nll,
                                          torch.square, replicas)
        online = self.online_gamma is not None
        if online and self.importances is not None:
            fisher = self.online_gamma * self.importances[0] + fisher
        self.add_anchor(fisher, detached_slow_weights(model), keep_previous=not online)


@register
class OnlineEWC(ElasticWeightConsolidation):
    r"""Online EWC (Schwarz et al., ICML 2018): :class:`ElasticWeightConsolidation` with one
    running Fisher ``F ← γ·F + F_new`` and the latest anchor."""

    name, display = "online-ewc", "Online EWC"
    options = {"ewc_lambda": EWC_LAMBDA, "fisher_samples": FISHER_SAMPLES,
               "online_ewc_gamma": Option(1.0, "Online EWC decay of the running Fisher.",
                                          high=1.0)}
    searched = {"split-mnist": 1000.0, "split-fashion-mnist": 1000.0, "permuted-mnist": 100.0,
                "imbalanced-permuted-mnist": 100.0}

    def __init__(self, ewc_lambda: float = EWC_LAMBDA.default, online_ewc_gamma: float = 1.0,
                 fisher_samples: int = FISHER_SAMPLES.default) -> None:
        super().__init__(ewc_lambda, online_ewc_gamma, fisher_samples)


@register
class SynapticIntelligence(QuadraticAnchors):
    r"""SI (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017).

    During a task, the path integral ``ω_i ← ω_i − g_i · Δθ_i`` accumulates, every step, the
    gradient ``g`` of the *task* loss (the cross-entropy, not the penalty) times the parameter
    change the optimiser made. The penalty's own gradient ``2·si_c·Ω·(θ − θ*)`` is known in closed
    form, so ``g`` is the stored gradient minus it, evaluated at the weights before the step.
    After the task: ``Ω ← Ω + max(ω / (Δ_task² + si_epsilon), 0)`` with ``Δ_task`` the task's total
    change, and the anchor θ* moves to the current weights. Negative contributions (possible with
    momentum) are clipped at zero so the penalty never rewards leaving the anchor.

    Penalty ``si_c · Σ_i Ω_i · (θ_i − θ*_i)²`` (Zenke et al.'s surrogate loss).

    Args:
        si_c: penalty strength c. Default 1.0 (Zenke et al. used c in [0.01, 1] on MNIST).
        si_epsilon: damping ξ for parameters that barely moved. Default 1e-3, Zenke et al.'s ξ.
    """

    name, display = "si", "SI"
    options = {"si_c": Option(1.0, "SI strength c."),
               "si_epsilon": Option(1e-3, "SI damping ξ.", low_open=True)}
    strength_option, search_values = "si_c", (0.1, 1.0, 10.0)
    searched = {"split-mnist": 1.0, "split-fashion-mnist": 1.0, "permuted-mnist": 0.01,
                "imbalanced-permuted-mnist": 0.01}

    def __init__(self, si_c: float = 1.0, si_epsilon: float = 1e-3) -> None:
        super().__init__()
        self.si_c = si_c
        self.si_epsilon = si_epsilon
        self.task_start: Optional[Tensor] = None  # θ when the current task began
        self.before_step: Optional[Tensor] = None  # θ before the latest optimiser step
        self.path_integral: Optional[Tensor] = None  # ω of the current task
        self._integrated = False  # this step's ω term already added by the penalised-SGD kernel

    def before_task(self, model: nn.Module) -> None:
        self.task_start = detached_slow_weights(model)
        self.before_step = self.task_start.clone()
        self.path_integral = torch.zeros_like(self.task_start)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        # Parameter by parameter on views of the flat state (foreach ops, no concatenation):
        # the same elementwise arithmetic as on the flat vectors, a third of SI's step overhead.
        if self.before_step is None:
            raise RuntimeError("SI: after_step needs the weights before the step, which the "
                               "plain-SGD path (after_sgd_step) of this task does not keep")
        params = list(slow_parameters(model).values())
        before = parameter_views(self.before_step, params)
        gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.anchors is not None:  # g_task = g − 2·c·Ω·(θ_before − θ*)
            offsets = torch._foreach_sub(before, parameter_views(self.anchors[0], params))
            gradients = torch._foreach_addcmul(gradients,
                                               parameter_views(self.importances[0], params),
                                               offsets, value=-2 * self.si_c)
        moves = torch._foreach_sub(params, before)
        torch._foreach_addcmul_(parameter_views(self.path_integral, params), gradients, moves,
                                value=-1)
        torch._foreach_copy_(before, params)

    def _fused_path_integral(self, model: nn.Module) -> list:
        return self._views.of(model, "path integral", self.path_integral)

    def penalised_sgd(self, model: nn.Module, grads: dict, lr: float) -> tuple[dict, frozenset]:
        totals, moved = super().penalised_sgd(model, grads, lr)
        self._integrated = bool(moved)  # the kernel added this step's ω term in its pass
        return totals, moved

    @torch.no_grad()
    def after_sgd_step(self, model: nn.Module, task_grads: dict, lr: float) -> None:
        # Plain SGD moved θ by −lr·g_total exactly, so −g_task·Δθ = lr·g_task·g_total: one pass,
        # with the task gradient as the lean step computed it (no subtraction of the penalty's).
        # Δθ is the update itself rather than the rounded difference of the weights. Where the
        # penalised-SGD kernel moved θ it added the term in its pass, with the same rounding.
        if not self._integrated:
            params = self._views.parameters(model)
            torch._foreach_addcmul_(self._views.of(model, "path integral", self.path_integral),
                                    [task_grads[id(p)] for p in params],
                                    [p.grad for p in params], value=lr)
        self._integrated = False
        self.before_step = None  # not kept on this path (after_step refuses to run without it)

    @torch.no_grad()
    def after_task(self, model, inputs, classes, generator, replicas: Replicas = SINGLE) -> None:
        now = detached_slow_weights(model)
        change = now - self.task_start
        importance = (self.path_integral / (change.square() + self.si_epsilon)).clamp_min(0)
        if self.importances is not None:
            importance = self.importances[0] + importance
        self.add_anchor(importance, now, keep_previous=False)
        self.path_integral.zero_()

    def state_dict(self) -> dict:
        return {**self.anchor_state(), "task_start": self.task_start,
                "before_step": self.before_step, "path_integral": self.path_integral}

    def load_state_dict(self, state: dict) -> None:
        self.load_anchor_state(state)
        self.task_start = state["task_start"]
        self.before_step = state["before_step"]
        self.path_integral = state["path_integral"]


def _squared_output_norm(logits: Tensor) -> Tensor:
    return logits.square().sum()


@register
class MemoryAwareSynapses(QuadraticAnchors):
    r"""MAS (Aljundi et al., "Memory Aware Synapses", ECCV 2018).

    Importance ``Ω_i = mean_k |∂ ‖F(x_k)‖²₂ / ∂θ_i|``: the magnitude of the per-sample gradient of
    the squared L2 norm of the network's output (the logits; in the task-incremental scenario the
    task's head) on at most ``fisher_samples`` training inputs, in eval mode. No labels are used.
    Importances accumulate over tasks (``Ω ← Ω + Ω_new``) with the latest anchor θ*.

    Penalty ``mas_lambda · Σ_i Ω_i · (θ_i − θ*_i)²`` (the paper's form, no ½).

    Args:
        mas_lambda: penalty strength. Default 1.0, the paper's value for its MNIST experiments.
        fisher_samples: training samples per importance estimate.
    """

    name, display = "mas", "MAS"
    options = {"mas_lambda": Option(1.0, "MAS strength."), "fisher_samples": FISHER_SAMPLES}
    strength_option, search_values = "mas_lambda", (0.1, 1.0, 10.0)
    searched = {"split-mnist": 1.0, "split-fashion-mnist": 1.0, "permuted-mnist": 0.01,
                "imbalanced-permuted-mnist": 0.01}

    def __init__(self, mas_lambda: float = 1.0,
                 fisher_samples: int = FISHER_SAMPLES.default) -> None:
        super().__init__()
        self.mas_lambda = mas_lambda
        self.fisher_samples = fisher_samples

    def after_task(self, model, inputs, classes, generator, replicas: Replicas = SINGLE) -> None:
        samples = sample_subset(inputs, self.fisher_samples, generator)
        importance = mean_per_sample_gradient(model, samples, classes, _squared_output_norm,
                                              torch.abs, replicas)
        if self.importances is not None:
            importance = self.importances[0] + importance
        self.add_anchor(importance, detached_slow_weights(model), keep_previous=False)


# The registered methods' tables, for the code that reads them (config, CLI, reproduction).
METHODS = tuple(REGISTRY)
STRENGTH_OPTION = {name: cls.strength_option for name, cls in REGISTRY.items()
                   if cls.strength_option}
DEFAULTS = {name: option.default for name, option in OPTIONS.items()}
SEARCHED_STRENGTHS = {benchmark: {name: cls.searched[benchmark] for name, cls in REGISTRY.items()
                                  if benchmark in cls.searched}
                      for benchmark in dict.fromkeys(b for cls in REGISTRY.values()
                                                     for b in cls.searched)}


def build_regularizer(method: str, **options) -> Regularizer:
    r"""The regulariser named ``method`` (one of :data:`REGISTRY`).

    ``options`` are registered option names (``TrainConfig.regularizer_arguments()`` gives all
    of them; each method takes the ones it declares); one left out takes its default.
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown regulariser options {sorted(unknown)}")
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}, expected one of {', '.join(REGISTRY)}")
    defaults = {name: option.default for name, option in OPTIONS.items()}
    return REGISTRY[method].from_options({**defaults, **options})
