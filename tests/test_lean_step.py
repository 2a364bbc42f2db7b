"""The lean training step against autograd: same loss, gradients, trace and training, no MNIST."""

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from dhp_deploy import fused_head
from dhp_deploy.tasks import batches
from dhp_deploy.cuda_graph import GraphedStep
from dhp_deploy.lean_step import (_cross_entropy_and_gradient, lean_gradients, python_step_gradients,
                                  step_gradients, supports_lean_step)
from dhp_deploy.network import DHPNet, task_logits
from dhp_deploy.importance import flat_slow_weights, slow_parameters
from dhp_deploy.regularizers import build_regularizer
from dhp_deploy.loop import Loop
from dhp_deploy.steps import OneRunSteps, target_map
from dhp_deploy.train import TrainConfig, TrainingRun
from synthetic import split_benchmark

IN, CLASSES = 20, 6
LABELS = {"repeated labels": [0, 3, 3, 1, 0, 3, 5, 5], "classes absent": [2, 2, 4],
          "batch of one": [1], "every class": [0, 1, 2, 3, 4, 5, 0, 1]}


def make_net(dhp: bool, seed: int = 0) -> DHPNet:
    torch.manual_seed(seed)
    net = DHPNet(IN, CLASSES, hidden=(16, 12), dhp=dhp, dtype=torch.float64).train()
    if dhp:  # a non-trivial point: large α and η, a trace from "earlier tasks"
        with torch.no_grad():
            net.head.alpha.uniform_(-1, 1)
            net.head.eta.fill_(0.3)
            net.head.hebb.uniform_(0, 1)
    return net


def built_kernels():
    r"""The fused DHP head's kernels; skips where they did not build (no C++ compiler or ninja)."""
    kernels = fused_head.kernels()
    if kernels is None:
        pytest.skip("the fused DHP head did not build here (no C++ compiler or ninja)")
    return kernels


@pytest.fixture(params=["fused", "eager"])
def head_kernel(request, monkeypatch):
    r"""Runs a test with the DHP head's fused CPU kernels, then with its eager torch ops."""
    if request.param == "fused":
        built_kernels()
    monkeypatch.setattr(fused_head, "ENABLED", request.param == "fused")
    return request.param


def autograd_reference(net, x, y, head, targets, penalty=None):
    logits = net(x, y)
    logits = logits if head is None else task_logits(logits, head)
    loss = F.cross_entropy(logits, targets)
    total = loss + (penalty(net) if penalty is not None else 0.0)
    grads = torch.autograd.grad(total, list(net.parameters()))
    return loss.detach(), logits.detach(), grads


@pytest.mark.parametrize("dhp", [True, False])
@pytest.mark.parametrize("multi_head", [True, False])
@pytest.mark.parametrize("case", list(LABELS))
def test_lean_gradients_equal_autograd(dhp, multi_head, case, head_kernel):
    y = torch.tensor(LABELS[case])
    x = torch.randn(len(y), IN, dtype=torch.float64)
    reference, lean = make_net(dhp), make_net(dhp)
    if multi_head:  # the loss covers a task's classes; targets are positions within them
        head = torch.unique(torch.cat([y, torch.tensor([5])]))
        targets = torch.searchsorted(head, y)
    else:
        head, targets = None, y
    loss, logits, grads = autograd_reference(reference, x, y, head, targets)
    lean_grads, lean_loss, lean_logits, hits = lean_gradients(lean, x, y, head, targets)
    torch.testing.assert_close(lean_loss, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(lean_logits, logits, rtol=0, atol=1e-12)
    assert hits.item() == (logits.argmax(1) == targets).sum().item()
    for (name, param), expected in zip(lean.named_parameters(), grads):
        torch.testing.assert_close(lean_grads[id(param)], expected, rtol=0, atol=1e-12,
                                   msg=name)
    if dhp:  # the trace moved as the layer's own training forward moves it
        torch.testing.assert_close(lean.head.hebb, reference.head.hebb, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["ewc", "mas", "si"])
def test_closed_form_penalty_gradients_equal_autograd(method):
    net = make_net(True)
    regularizer = build_regularizer(method, fisher_samples=16)
    regularizer.before_task(net)
    with torch.no_grad():  # an anchor with made-up importances, then move away from it
        anchor = flat_slow_weights(net).clone()
        regularizer.add_anchor(torch.rand(anchor.numel(), dtype=torch.float64), anchor)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = torch.autograd.grad(regularizer.penalty(net), list(net.parameters()),
                                   allow_unused=True)
    task = {id(p): torch.randn_like(p) for p in net.parameters()}
    given = {key: g.clone() for key, g in task.items()}
    totals = regularizer.gradients_with_penalty(net, given)
    closed = {key: totals[key] - task[key] for key in task}
    assert all(torch.equal(given[key], task[key]) for key in task)  # the task gradients stay
    for (name, param), grad in zip(net.named_parameters(), expected):
        if name in ("head.alpha", "head.eta"):
            assert not closed[id(param)].any() and (grad is None or not grad.any())
        else:
            torch.testing.assert_close(closed[id(param)], grad, rtol=1e-12, atol=1e-12,
                                       msg=name)


@pytest.mark.parametrize("method", ["finetune", "ewc", "si"])
@pytest.mark.parametrize("dhp", [True, False])
def test_training_with_the_lean_step_matches_autograd(tmp_path, method, dhp, head_kernel):
    config = TrainConfig(benchmark="split-mnist", method=method, dhp=dhp, epochs=2,
                         batch_size=16, lr=0.05, hidden=(16,), fisher_samples=32, ewc_lambda=100.0,
                         si_c=1.0)
    runs = {}
    for lean in (True, False):
        run = TrainingRun.start(config, split_benchmark(IN, train=256, test=64), tmp_path / str(lean), lean=lean)
        assert run.lean == lean
        runs[lean] = (run, run.run())
    (lean_run, lean_metrics), (autograd_run, autograd_metrics) = runs[True], runs[False]
    for (name, a), b in zip(lean_run.model.state_dict().items(),
                            autograd_run.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    flat = [v for row in lean_metrics["acc_matrix"] for v in row]
    assert flat == pytest.approx([v for row in autograd_metrics["acc_matrix"] for v in row],
                                 abs=0.02)


@pytest.mark.slow
def test_fused_and_eager_heads_train_alike_in_float32(monkeypatch):
    r"""200 float32 steps at a large η (0.7, lerp's other branch): the fused head tracks the eager
    one to float32 rounding, and the lean step uses it on the CPU."""
    built_kernels()
    nets, generator = {}, torch.Generator().manual_seed(1)
    data = [(torch.randn(32, IN, generator=generator), torch.randint(0, CLASSES, (32,),
                                                                    generator=generator))
            for _ in range(200)]
    for fused in (True, False):
        monkeypatch.setattr(fused_head, "ENABLED", fused)
        torch.manual_seed(0)
        net = DHPNet(IN, CLASSES, hidden=(16,), dhp=True).train()
        with torch.no_grad():
            net.head.eta.fill_(0.7)
        for x, y in data:
            assert fused_head.usable(x) == fused
            grads, *_ = lean_gradients(net, x, y, None, y)
            with torch.no_grad():
                for param in net.parameters():
                    param.sub_(0.05 * grads[id(param)])
        nets[fused] = net
    for (name, a), b in zip(nets[True].state_dict().items(), nets[False].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_head_refuses_labels_out_of_range():
    kernels = built_kernels()
    with pytest.raises(RuntimeError, match="label 6 is not in"):
        kernels.class_stats(torch.randn(3, IN), torch.tensor([0, 6, 1]), CLASSES)


@pytest.mark.parametrize("head", [None, [3, 1, 4]], ids=["all classes", "task head"])
def test_fused_cross_entropy_equals_the_eager_one(head):
    kernels = built_kernels()
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(16, CLASSES, dtype=torch.float64, generator=generator) * 30
    logits[0] = 1.0  # ties: the first maximum is the prediction, as argmax's
    classes = torch.empty(0, dtype=torch.int64) if head is None else torch.tensor(head)
    used = logits if head is None else logits.index_select(1, classes)
    targets = torch.randint(0, used.shape[1], (16,), generator=generator)
    loss, dz, fused_used, hits = kernels.cross_entropy(logits, classes, targets, 64)
    expected_loss, expected_dlogits = _cross_entropy_and_gradient(used, targets, 64)
    expected_dz = torch.zeros_like(logits)
    expected_dz[:, classes if head is not None else slice(None)] = expected_dlogits
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(dz, expected_dz, rtol=1e-12, atol=1e-15)
    assert torch.equal(fused_used, used) and hits == (used.argmax(1) == targets).sum()
    with pytest.raises(RuntimeError, match=f"label {used.shape[1]} is not in"):
        kernels.cross_entropy(logits, classes, torch.full((16,), used.shape[1]), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dhp", [True, False])
@pytest.mark.parametrize("multi_head", [True, False])
@pytest.mark.parametrize("case", list(LABELS))
def test_the_one_call_step_is_the_python_step_bit_for_bit(case, multi_head, dhp, dtype):
    r"""csrc/lean_step.cpp runs python_step_gradients' ATen ops in its order: the same bits for the
    gradients, loss, logits, hits and the updated trace, so a run's results do not depend on it."""
    built_kernels()
    y = torch.tensor(LABELS[case])
    x = torch.randn(len(y), IN, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(len(y))).to(dtype)
    head = torch.tensor([3, 0, 5, 1, 2, 4]) if multi_head else None  # a permuted task head
    targets = target_map(head, CLASSES, "cpu").index_select(0, y) if multi_head else y
    results, traces = [], []
    for step in (step_gradients, python_step_gradients):
        net = make_net(dhp).to(dtype)
        hebb = net.head.hebb if dhp else None
        results.append(step(list(net.parameters()), hebb, x, y, head, targets, 64, fused=True))
        traces.append(hebb)
    (grads, *outputs), (expected_grads, *expected_outputs) = results
    assert len(grads) == len(expected_grads) == len(list(make_net(dhp).parameters()))
    for a, b in zip(grads + outputs, expected_grads + expected_outputs):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert not dhp or torch.equal(traces[0], traces[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["ewc", "online-ewc", "mas", "si"])
def test_fused_penalised_sgd_equals_the_torch_ops(method, dtype, monkeypatch):
    r"""The one-pass penalty + SGD update (csrc/penalised_sgd.cpp; for SI with its path integral)
    against the torch ops it replaces: bit for bit where torch's CPU kernels fuse their
    multiply-adds (its AVX2/AVX-512 kernels in torch 2.13, measured; a torch build may change
    that), else within a few roundings of the largest penalty term (an unfused total can cancel
    against g)."""
    if not built_kernels().penalised_sgd_vectorised():
        pytest.skip("no FMA units: the torch ops keep the update")
    nets, totals = {}, {}
    for fused in (True, False):
        monkeypatch.setattr(fused_head, "ENABLED", fused)
        torch.manual_seed(4)
        net = make_net(True).to(dtype)
        regularizer = build_regularizer(method, fisher_samples=16, ewc_lambda=30.0, si_c=3.0,
                                        mas_lambda=3.0)
        regularizer.before_task(net)
        with torch.no_grad():  # an anchor with made-up importances, then move away from it
            anchor = flat_slow_weights(net).clone()
            regularizer.add_anchor(torch.rand(anchor.numel(), dtype=dtype), anchor)
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        # The head's gradient arrives transposed, as the lean step computes it.
        task = {id(p): (torch.randn_like(p.t()).t() if p.dim() == 2 and p.shape[1] == CLASSES
                        else torch.randn_like(p)) for p in net.parameters()}
        grads, moved = regularizer.penalised_sgd(net, task, 0.05)
        slow = {id(p) for p in slow_parameters(net).values()}  # all but α and η
        assert moved == (slow if fused else frozenset())
        params = list(net.parameters())
        rest = [p for p in params if id(p) not in moved]
        with torch.no_grad():
            for p in rest:
                p.add_(grads[id(p)], alpha=-0.05)
        for p in params:  # as the lean step leaves them
            p.grad = grads[id(p)]
        regularizer.after_sgd_step(net, task, 0.05)  # SI's path integral: in the kernel's pass
        nets[fused], totals[fused] = net, [grads[id(p)] for p in params]
        if method == "si":
            totals[fused].append(regularizer.path_integral)
    exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    eps = torch.finfo(dtype).eps
    for a, b in zip(totals[True], totals[False]):
        scale = 0 if exact else 4 * eps * max(a.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, rtol=0, atol=scale)
    for (name, a), b in zip(nets[True].named_parameters(), nets[False].parameters()):
        scale = 0 if exact else 4 * eps * max(a.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, rtol=0, atol=scale, msg=name)


def test_fused_penalised_sgd_refuses_mismatched_operands_before_any_write():
    kernels = built_kernels()
    first, second = torch.zeros(8), torch.zeros(2, 4)
    ones = [torch.ones(8), torch.ones(2, 4)]
    with pytest.raises(RuntimeError, match="anchor 1 must be a contiguous CPU tensor"):
        kernels.penalised_sgd([first, second], ones, ones, [torch.ones(8), torch.ones(4, 2)], 0.1)
    with pytest.raises(RuntimeError, match="curvature 1 must be"):
        kernels.penalised_sgd([first, second], ones, [torch.ones(8), torch.ones(2, 4).double()],
                              ones, 0.1)
    assert not first.any() and not second.any()  # the first parameter did not move either


def test_other_models_fall_back_to_autograd():
    assert supports_lean_step(make_net(True)) and supports_lean_step(make_net(False))
    net = make_net(True)
    net.trunk.append(torch.nn.Tanh())
    assert not supports_lean_step(net)
    assert not supports_lean_step(torch.nn.Linear(3, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dhp", [True, False])
def test_lean_step_on_cuda_matches_cpu_without_host_syncs(dhp):
    y = torch.tensor(LABELS["repeated labels"])
    x = torch.randn(len(y), IN, dtype=torch.float64)
    head = torch.tensor([0, 1, 3, 5])
    targets = torch.searchsorted(head, y)
    cpu, gpu = make_net(dhp), make_net(dhp).cuda()
    expected, *_ = lean_gradients(cpu, x, y, head, targets)
    inputs = [t.cuda() for t in (x, y, head, targets)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the step raises
    try:
        grads, *_ = lean_gradients(gpu, *inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for cpu_param, gpu_param in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(grads[id(gpu_param)].cpu(), expected[id(cpu_param)],
                                   rtol=1e-10, atol=1e-10)


def _on_cuda(benchmark):
    fields = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    tasks = [dataclasses.replace(task, **{name: getattr(task, name).cuda() for name in fields})
             for task in benchmark.tasks]
    return dataclasses.replace(benchmark, tasks=tasks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["finetune", "ewc", "si", "mas"])
def test_a_whole_cuda_training_epoch_needs_no_host_sync(tmp_path, method):
    # Task 0 trains and consolidates normally; every step of task 1's epoch (penalty active) then
    # runs under sync debug mode "error": only the epoch boundary may wait for the device.
    config = TrainConfig(benchmark="split-mnist", method=method, dhp=True, epochs=1,
                         batch_size=16, lr=0.05, hidden=(16,), fisher_samples=32,
                         ewc_lambda=100.0, si_c=1.0, mas_lambda=1.0)
    run = TrainingRun.start(config, _on_cuda(split_benchmark(IN, train=256, test=64)),
                            tmp_path, device="cuda")
    assert run.lean
    steps = OneRunSteps(run)
    run.regularizer.before_task(run.model)
    steps.train_epoch(0, 0)
    run.end_task(0)
    run.regularizer.before_task(run.model)
    task, head = run.benchmark.tasks[1], run.heads[1]
    targets_of = target_map(head, run.benchmark.num_classes, run.device)
    epoch = list(batches(task.x_train, task.y_train, config.batch_size,
                         torch.Generator().manual_seed(0)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for xb, yb in epoch:
            steps.step(xb, yb, head, targets_of)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["finetune", "ewc", "si"])
@pytest.mark.parametrize("dhp", [True, False])
def test_training_replayed_as_cuda_graphs_equals_eager_training(tmp_path, method, dhp):
    # 250 examples at batch 16: 15 replayed steps and a short eager one per epoch; two tasks, so
    # the second is captured anew with the regulariser's consolidated state.
    config = TrainConfig(benchmark="split-mnist", method=method, dhp=dhp, epochs=2,
                         batch_size=16, lr=0.05, hidden=(16,), fisher_samples=32,
                         ewc_lambda=100.0, si_c=1.0)
    runs = {}
    for graphs in (True, False):
        run = TrainingRun.start(config, _on_cuda(split_benchmark(IN, train=250, test=64)),
                                tmp_path / str(graphs), device="cuda", cuda_graphs=graphs)
        steps = OneRunSteps(run)
        runs[graphs] = (run, Loop([run], steps, keep_going=False).run()[run], steps)
        assert steps.graphs.enabled == graphs
    (graphed, graphed_metrics, graphed_steps), (eager, eager_metrics, _) = runs[True], runs[False]
    assert any(isinstance(step, GraphedStep) for step in graphed_steps.graphs.captured.values())
    for (name, a), b in zip(graphed.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # Weights equal to rounding: a test example near the boundary may flip, no more.
    flat = [value for row in graphed_metrics["acc_matrix"] for value in row]
    assert flat == pytest.approx([value for row in eager_metrics["acc_matrix"] for value in row],
                                 abs=2 / 64)
    assert [e["loss"] for e in graphed.progress.epochs] == pytest.approx(
        [e["loss"] for e in eager.progress.epochs], rel=1e-5)


def test_graphed_steps_warm_up_capture_replay_and_fall_back(monkeypatch):
    # The per-task state machine the training loop and the cohort share, on the CPU with the
    # CUDA parts replaced by recorders (a real capture runs in the gpu tests above).
    from dhp_deploy import cuda_graph
    calls = []

    class Capture:
        def __init__(self, step, x, y):
            if calls and calls[-1] == "fail next":
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
            calls.append(("capture", len(y)))
            self.step = step

        def __call__(self, x, y):
            calls.append(("replay", len(y)))
            return self.step(x, y)

    monkeypatch.setattr(cuda_graph, "GraphedStep", Capture)
    monkeypatch.setattr(cuda_graph, "warm_up",
                        lambda step, x, y: calls.append("warm") or step(x, y))
    logged = []
    graphs = cuda_graph.GraphedSteps(True, batch_size=4, log=logged.append)

    def step(x, y):
        calls.append(("eager", len(y)))
        return (x.sum(),)

    full, short = (torch.ones(4, 2), torch.zeros(4)), (torch.ones(3, 2), torch.zeros(3))
    for batch in (full, full, full, short):
        graphs("task 0", step, *batch)
    assert calls == ["warm", ("eager", 4), ("capture", 4), ("replay", 4), ("eager", 4),
                     ("replay", 4), ("eager", 4), ("eager", 3)]
    graphs.clear()  # a new task: warm up and capture again
    calls.clear()
    graphs("task 1", step, *full)
    calls.append("fail next")
    graphs("task 1", step, *full)  # the capture fails: eager from now on, said once
    graphs("task 1", step, *full)
    assert calls == ["warm", ("eager", 4), "fail next", ("eager", 4), ("eager", 4)]
    assert not graphs.enabled and len(logged) == 1
    assert logged[0].startswith("CUDA graph capture failed (operation not permitted")


def test_a_run_says_when_it_compiles_the_kernels_and_not_again(tmp_path, data_dir):
    r"""A first build takes ~20 s: dhp-train says so before it starts (else the run seems to hang
    and the first epoch's time and throughput include the build), and says nothing once built.
    The copied build folder without its library relinks the compiled objects (a fast build)."""
    built_kernels()
    copy = tmp_path / fused_head.build_directory().name
    shutil.copytree(fused_head.build_directory(), copy)
    for library in copy.glob("*.so"):
        library.unlink()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DHP_DATA_DIR": str(data_dir)}
    env.pop("DHP_FUSED_HEAD", None)  # the kernels on, as a user has them
    tiny = ["--benchmark", "split-mnist", "--dhp", "--epochs", "1", "--num-tasks", "1",
            "--train-limit", "64", "--test-limit", "64", "--threads", "1", "--device", "cpu"]

    def train(name: str) -> list[str]:
        result = subprocess.run([sys.executable, "-m", "dhp_deploy.cli.train", *tiny, "--out",
                                 str(tmp_path / name)], capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        return result.stderr.splitlines()

    first, second = train("first"), train("second")
    said = [n for n, line in enumerate(first) if line.startswith("compiling the fused CPU kernels")]
    started = [n for n, line in enumerate(first) if line.startswith("epoch 1/1")
               or line.startswith("task 1/1 epoch 1/1")]
    assert len(said) == 1 and first[said[0]].endswith(f") into {copy}")
    assert started and said[0] < started[0]  # said before the first epoch's line
    assert list(copy.glob("*.so")) and not any("compiling" in line for line in second)


def test_a_stale_build_lock_does_not_hang_the_next_run(tmp_path):
    r"""A builder killed outright leaves torch's lock file; a later process must not wait on it
    forever (torch's own wait has no timeout): a lock older than a build can take is removed."""
    built_kernels()
    built = fused_head.build_directory()
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    lock = copy / "lock"
    lock.touch()
    old = time.time() - fused_head.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    script = "from dhp_deploy import fused_head; assert fused_head.kernels() is not None"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert not lock.exists()
