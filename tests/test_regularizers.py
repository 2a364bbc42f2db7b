"""Regularisers: penalties zero at the anchor, per-sample importances against a literal loop,
the DHP trace untouched by consolidation, SI's path integral, and state that survives a checkpoint.
Synthetic tensors: these are maths, not MNIST."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from dhp_deploy.network import DHPNet, task_logits
from dhp_deploy.importance import flat_slow_weights, mean_per_sample_gradient, slow_parameters
from dhp_deploy.regularizers import (METHODS, ElasticWeightConsolidation, Finetune,
                                     MemoryAwareSynapses, SynapticIntelligence, build_regularizer)
from dhp_deploy.steps import OneRunSteps, target_map
from dhp_deploy.train import TrainConfig, TrainingRun
from synthetic import split_benchmark

CONSOLIDATING = [m for m in METHODS if m != "finetune"]


@pytest.fixture(scope="module")
def split_tasks():
    return split_benchmark(784, train=256, test=64)


def make_model(dhp=True, seed=0):
    torch.manual_seed(seed)
    return DHPNet(784, 10, hidden=(32,), dhp=dhp)


def train_steps(model, regularizer, task, steps=8, lr=0.05):
    """A few SGD steps on ``ce + penalty`` over one task's head, as the trainer takes them."""
    head = torch.tensor(task.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    regularizer.before_task(model)
    for xb, yb in zip(task.x_train.split(32)[:steps], task.y_train.split(32)[:steps]):
        targets = (yb == head[1]).long()  # position within the two-class head
        loss = F.cross_entropy(task_logits(model(xb, yb), head), targets)
        loss = loss + regularizer.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        regularizer.after_step(model)


def consolidate(model, regularizer, task):
    regularizer.after_task(model, task.x_train, torch.tensor(task.classes),
                           torch.Generator().manual_seed(0))


def nudge(parameter, amount=1e-2):
    with torch.no_grad():
        parameter.add_(amount * torch.randn_like(parameter))


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
def test_slow_parameters_leave_out_only_plasticity(dhp):
    names = set(slow_parameters(make_model(dhp)))
    all_names = {name for name, _ in make_model(dhp).named_parameters()}
    expected = all_names - {"head.alpha", "head.eta"}
    assert names == expected
    assert ("head.w" in names) == dhp and ("head.linear.weight" in names) == (not dhp)


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
@pytest.mark.parametrize("method", CONSOLIDATING)
def test_penalty_is_exactly_zero_at_the_anchor_and_positive_away(method, dhp, split_tasks):
    model = make_model(dhp)
    regularizer = build_regularizer(method, fisher_samples=128)
    assert regularizer.penalty(model) == 0.0  # nothing consolidated yet: no work, no penalty
    task = split_tasks.tasks[0]
    train_steps(model, regularizer, task)
    consolidate(model, regularizer, task)

    at_anchor = regularizer.penalty(model)
    assert torch.is_tensor(at_anchor) and at_anchor.item() == 0.0
    if dhp:  # plasticity parameters are not anchored: moving them costs nothing
        nudge(model.head.alpha)
        nudge(model.head.eta)
        assert regularizer.penalty(model).item() == 0.0
    nudge(model.trunk[0].weight)
    away = regularizer.penalty(model)
    assert away.item() > 0.0
    away.backward()  # through autograd, into the slow weights
    assert model.trunk[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", CONSOLIDATING)
def test_consolidation_leaves_the_trace_and_mode_alone(method, split_tasks):
    model = make_model(dhp=True)
    regularizer = build_regularizer(method, fisher_samples=128)
    task = split_tasks.tasks[0]
    train_steps(model, regularizer, task)
    hebb_before = model.head.hebb.clone()
    assert hebb_before.abs().sum() > 0
    consolidate(model, regularizer, task)
    assert torch.equal(model.head.hebb, hebb_before)
    assert model.training


def literal_mean(model, inputs, head, sample_loss, transform):
    """Oracle: one autograd pass per sample, in eval mode."""
    model.eval()
    params = list(slow_parameters(model).values())
    total = 0
    for x in inputs:
        logits = model(x[None])
        logits = (logits if head is None else task_logits(logits, head))[0]
        grads = torch.autograd.grad(sample_loss(logits), params)
        total = total + transform(torch.cat([g.reshape(-1) for g in grads]))
    model.train()
    return total / len(inputs)


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
def test_per_sample_fisher_and_mas_importance_match_a_loop(dhp, split_tasks):
    model = make_model(dhp)
    task = split_tasks.tasks[1]
    train_steps(model, Finetune(), task)
    inputs, head = task.x_train[:20], torch.tensor(task.classes)

    def predicted_nll(logits):
        return F.cross_entropy(logits[None], logits.argmax()[None])

    def squared_norm(logits):
        return logits.pow(2).sum()

    for loss, transform in [(predicted_nll, torch.square), (squared_norm, torch.abs)]:
        vectorised = mean_per_sample_gradient(model, inputs, head, loss, transform)
        expected = literal_mean(model, inputs, head, loss, transform)
        # fp32 sums in another order: an entry ~1e-5 may differ by a few 1e-9, so the absolute
        # tolerance scales with the largest importance (1e-6 of it), the relative one stays 1e-4.
        torch.testing.assert_close(vectorised, expected, rtol=1e-4,
                                   atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
@pytest.mark.parametrize("multi_head", [True, False], ids=["task head", "all classes"])
def test_closed_form_importances_equal_per_sample_gradients_in_float64(dhp, multi_head,
                                                                     split_tasks):
    # The lean networks' Fisher and MAS sums are one batched backward (T(δ)ᵀ T(a)); in float64
    # they equal the literal per-sample gradients to rounding. Another transform takes the vmap
    # path, which must agree too.
    model = make_model(dhp)
    task = split_tasks.tasks[1]
    train_steps(model, Finetune(), task)  # a trained trace, not zeros
    model = model.double()
    inputs = task.x_train[:24].double()
    head = torch.tensor(task.classes) if multi_head else None

    def predicted_nll(logits):
        return -torch.log_softmax(logits, dim=0).max()

    def squared_norm(logits):
        return logits.square().sum()

    def cube(gradient):  # not multiplicative-listed: per-sample gradients by vmap
        return gradient ** 3

    for loss, transform in [(predicted_nll, torch.square), (squared_norm, torch.abs),
                            (predicted_nll, cube)]:
        got = mean_per_sample_gradient(model, inputs, head, loss, transform)
        expected = literal_mean(model, inputs, head, loss, transform)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_ewc_keeps_one_anchor_per_task_and_online_ewc_one_decayed_fisher(split_tasks):
    model = make_model()
    ewc = ElasticWeightConsolidation(ewc_lambda=10.0, fisher_samples=64)
    online = ElasticWeightConsolidation(ewc_lambda=10.0, online_gamma=0.5, fisher_samples=64)
    fishers = []
    for task in split_tasks.tasks:
        train_steps(model, ewc, task)
        consolidate(model, ewc, task)
        consolidate(model, online, task)
        fishers.append(ewc.importances[-1])
    assert ewc.anchors.shape[0] == 2 and online.anchors.shape[0] == 1
    torch.testing.assert_close(online.importances[0], 0.5 * fishers[0] + fishers[1])
    assert torch.equal(online.anchors[0], flat_slow_weights(model).detach())
    # The EWC penalty is the sum over tasks of (λ/2)·Σ F_t (θ − θ*_t)².
    nudge(model.trunk[0].weight)
    theta = flat_slow_weights(model).detach()
    expected = sum(5.0 * (f * (theta - a).square()).sum() for f, a in zip(ewc.importances,
                                                                           ewc.anchors))
    torch.testing.assert_close(ewc.penalty(model).detach(), expected)
    # ... and so is its gradient (the penalty is computed from one merged row).
    slow = list(slow_parameters(model).values())
    merged_grads = torch.autograd.grad(ewc.penalty(model), slow)
    per_task = sum(5.0 * (f * (flat_slow_weights(model) - a).square()).sum()
                   for f, a in zip(ewc.importances, ewc.anchors))
    per_task_grads = torch.autograd.grad(per_task, slow)
    scale = max(g.abs().max().item() for g in per_task_grads)
    # float32 rounding relative to the scale: the merged row's Σ F_t·(θ − θ*_t) cancels terms
    # larger than their sum (an entry that should be 0 came out 3e-8 against a scale of 2e-3).
    for got, want in zip(merged_grads, per_task_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_si_path_integral_uses_the_task_gradient_not_the_penalty(split_tasks):
    model = make_model()
    si = SynapticIntelligence(si_c=5.0, si_epsilon=1e-3)
    task0, task1 = split_tasks.tasks
    train_steps(model, si, task0)
    consolidate(model, si, task0)
    assert si.importances.min() >= 0 and si.importances.sum() > 0

    # One step of the second task by hand: ω must grow by −g_task·Δθ with g_task the ce gradient.
    si.before_task(model)
    head = torch.tensor(task1.classes)
    xb, yb = task1.x_train[:32], task1.y_train[:32]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = flat_slow_weights(model).detach().clone()
    model.train()
    hebb = model.head.hebb.clone()
    ce = F.cross_entropy(task_logits(model(xb, yb), head), (yb == head[1]).long())
    task_gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        ce, list(slow_parameters(model).values()), retain_graph=True)])
    loss = ce + si.penalty(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    si.after_step(model)
    change = flat_slow_weights(model).detach() - before
    torch.testing.assert_close(si.path_integral, -task_gradient * change, rtol=1e-3, atol=1e-12)
    assert not torch.equal(model.head.hebb, hebb)  # the step did train the DHP head


def test_si_on_the_lean_sgd_path_integrates_the_task_gradient_times_the_step(split_tasks,
                                                                             tmp_path):
    r"""dhp-train's own step (lean, plain SGD): ω grows by −g_task·Δθ = lr·g_task·g, with g_task
    the ce gradient and g the gradient of ce + penalty, both by autograd on a copy of the network,
    and the weights moved by −lr·g."""
    config = TrainConfig(method="si", si_c=5.0, hidden=(32,), lr=0.05, batch_size=32)
    run = TrainingRun(config, split_tasks, tmp_path, "cpu")
    model, si = run.model, run.regularizer
    assert run.lean
    for task_id, task in enumerate(split_tasks.tasks):
        head = torch.tensor(task.classes)
        targets_of = target_map(head, split_tasks.num_classes, "cpu")
        si.before_task(model)
        for xb, yb in zip(task.x_train.split(32)[:4], task.y_train.split(32)[:4]):
            reference = copy.deepcopy(model)
            slow = list(slow_parameters(reference).values())
            ce = F.cross_entropy(task_logits(reference(xb, yb), head), targets_of[yb])
            task_gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                ce, slow, retain_graph=True)])
            gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                ce + si.penalty(reference), slow)])
            before, integral = flat_slow_weights(model).detach().clone(), si.path_integral.clone()
            OneRunSteps(run).step(xb, yb, head, targets_of)
            torch.testing.assert_close(flat_slow_weights(model).detach() - before,
                                       -config.lr * gradient, rtol=1e-3, atol=1e-7)
            expected = config.lr * task_gradient * gradient  # float32: rounding of the largest
            torch.testing.assert_close(si.path_integral - integral, expected, rtol=1e-4,
                                       atol=1e-5 * expected.abs().max().item())
        if task_id == 0:  # the second task's steps carry the penalty: ω must leave it out
            consolidate(model, si, task)
            assert si.importances.sum() > 0 and si.penalty(model) == 0


@pytest.mark.parametrize("method", METHODS)
def test_state_survives_a_weights_only_round_trip(method, split_tasks):
    model = make_model()
    regularizer = build_regularizer(method, fisher_samples=64)
    task = split_tasks.tasks[0]
    train_steps(model, regularizer, task)
    consolidate(model, regularizer, task)
    regularizer.before_task(model)
    train_steps(model, regularizer, split_tasks.tasks[1], steps=3)  # mid-task state (SI)

    buffer = io.BytesIO()
    torch.save(regularizer.state_dict(), buffer)
    buffer.seek(0)
    restored = build_regularizer(method, fisher_samples=64)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert regularizer.state_dict().keys() == restored.state_dict().keys()
    for key, value in regularizer.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    penalty = regularizer.penalty(model)
    assert (penalty == restored.penalty(model)) if method != "finetune" else penalty == 0.0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        build_regularizer("l2")


def test_mas_importance_accumulates_over_tasks(split_tasks):
    model = make_model()
    mas = MemoryAwareSynapses(mas_lambda=1.0, fisher_samples=64)
    for task in split_tasks.tasks:
        train_steps(model, mas, task)
        previous = None if mas.importances is None else mas.importances[0].clone()
        consolidate(model, mas, task)
        if previous is not None:
            assert torch.all(mas.importances[0] >= previous)
    assert mas.anchors.shape[0] == 1


# ------------------------------------------------------------- no rows: empty calls and shards


def _importance_setup():
    r"""A DHP model with a non-zero trace and 5 input rows, the same in every process."""
    model = make_model(dhp=True)
    with torch.no_grad():
        model.head.hebb.copy_(torch.rand(model.head.hebb.shape,
                                         generator=torch.Generator().manual_seed(1)))
    return model, torch.rand(5, 784, generator=torch.Generator().manual_seed(2))


def _importances(model, inputs, replicas) -> dict:
    r"""EWC's Fisher and MAS's importance of one sample of ``inputs`` (fisher_samples=1)."""
    from dhp_deploy.distributed import SINGLE

    found = {}
    for method in (ElasticWeightConsolidation, MemoryAwareSynapses):
        regularizer = method(fisher_samples=1)
        regularizer.after_task(model, inputs, torch.tensor([2, 3]),
                               torch.Generator().manual_seed(0), replicas or SINGLE)
        found[method.__name__] = regularizer.importances[0]
    return found


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
def test_a_0_row_call_returns_zero_sums(dhp):
    model = make_model(dhp)
    size = flat_slow_weights(model).numel()
    no_rows = torch.empty(0, 784)
    for head in (None, torch.tensor([2, 3])):
        for transform in (torch.square, torch.abs, lambda g: g ** 3):  # closed form, then vmap
            got = mean_per_sample_gradient(model, no_rows, head, lambda z: z.square().sum(),
                                           transform)
            assert torch.equal(got, torch.zeros(size)), (head, transform)


def _rank_importances(rank: int, init_file: str, out_dir: str) -> None:
    r"""One gloo rank of two (torch.multiprocessing.spawn): rank 1's shard of one sample is empty."""
    from datetime import timedelta

    import torch.distributed as dist

    from dhp_deploy.distributed import Replicas

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank skipping a collective fails
    try:
        model, inputs = _importance_setup()
        found = _importances(model, inputs, Replicas(rank, 2, "gloo"))
        torch.save(found, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_ranks_with_fewer_samples_than_ranks_give_the_one_process_importances(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_importances, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    model, inputs = _importance_setup()
    expected = _importances(model, inputs, None)
    assert all(value.abs().sum() > 0 for value in expected.values())  # not vacuous zeros
    for rank in (0, 1):
        found = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in expected.items():  # one sample's sum is rank 0's alone: bit-equal
            assert torch.equal(found[name], value), (rank, name)


class _PenaltyOnly(Finetune):
    r"""A new method as a user would start one: a penalty and nothing else (L2 on the weights)."""

    def penalty(self, model):
        return 0.5 * sum((p ** 2).sum() for p in model.parameters())


@pytest.mark.parametrize("dhp", [True, False], ids=["dhp", "plain"])
def test_a_method_with_only_a_penalty_is_applied_on_the_lean_path(dhp, tmp_path):
    # The lean step runs without autograd; a method without a closed form must still get its
    # penalty's gradient (by autograd of penalty()), not silently none.
    benchmark = split_benchmark(20, train=64, test=16)

    def one_step(lean, regularizer):
        config = TrainConfig(benchmark="split-mnist", method="finetune", dhp=dhp, hidden=(8,),
                             lr=0.1, batch_size=16)
        run = TrainingRun(config, benchmark, tmp_path, "cpu", lean=lean)
        run.regularizer = regularizer
        task, head = benchmark.tasks[0], run.heads[0]
        OneRunSteps(run).step(task.x_train[:16], task.y_train[:16], head,
                              target_map(head, benchmark.num_classes, run.device))
        return {name: p.detach().clone() for name, p in run.model.named_parameters()}

    lean, autograd = one_step(True, _PenaltyOnly()), one_step(False, _PenaltyOnly())
    for name, value in autograd.items():
        torch.testing.assert_close(lean[name], value, rtol=1e-5, atol=1e-6)
    unpenalised = one_step(True, Finetune())  # the penalty mattered
    assert any(not torch.allclose(lean[name], unpenalised[name]) for name in lean)
