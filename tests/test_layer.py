"""DHPSoftmax against a literal per-class loop of Algorithm 1 (the oracle), and its contracts."""

import io

import pytest
import torch

from dhp_deploy import DHPNet, DHPSoftmax, task_logits
from dhp_deploy.layer import algorithm1_step

IN, OUT = 12, 6


BATCHES = {
    "repeated labels": [0, 3, 3, 1, 0, 3, 5, 5],
    "classes absent": [2, 2, 4],
    "batch of one": [1],
    "single class": [5, 5, 5, 5],
    "every class": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0],
}


def make_layer(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = DHPSoftmax(IN, OUT, dtype=dtype)
    with torch.no_grad():  # a non-trivial starting point: larger α, some trace from "earlier tasks"
        layer.alpha.uniform_(-1, 1)
        layer.eta.fill_(0.3)
        layer.hebb.normal_()
    return layer


def oracle_and_module_grads(layer, h, y):
    """Run one training step through the module and through the oracle; return both results."""
    params = [layer.w, layer.alpha, layer.eta]
    h_mod = h.clone().requires_grad_()
    hebb_before = layer.hebb.clone()
    z = layer(h_mod, y)
    upstream = torch.randn_like(z)
    grads = torch.autograd.grad((z * upstream).sum(), params + [h_mod])

    h_ref = h.clone().requires_grad_()
    z_ref, hebb_ref = algorithm1_step(hebb_before, h_ref, y, layer.eta, layer.w, layer.alpha)
    grads_ref = torch.autograd.grad((z_ref * upstream).sum(), params + [h_ref])
    return (z, layer.hebb, grads), (z_ref, hebb_ref, grads_ref)


@pytest.mark.parametrize("case", list(BATCHES))
def test_equals_algorithm1_over_consecutive_steps(case):
    layer = make_layer().train()
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor(BATCHES[case])
    for step in range(4):  # the trace is carried from step to step
        y = labels[torch.randperm(len(labels), generator=gen)]
        h = torch.randn(len(y), IN, generator=gen, dtype=torch.float64)
        (z, hebb, grads), (z_ref, hebb_ref, grads_ref) = oracle_and_module_grads(layer, h, y)
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hebb, hebb_ref.detach(), rtol=1e-12, atol=1e-12)
        for name, g, g_ref in zip(["w", "alpha", "eta", "h"], grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12, msg=f"grad {name}")


def test_absent_classes_keep_their_column_exactly():
    layer = make_layer().train()
    before = layer.hebb.clone()
    layer(torch.randn(3, IN, dtype=torch.float64), torch.tensor([2, 2, 4]))
    untouched = [0, 1, 3, 5]
    assert torch.equal(layer.hebb[:, untouched], before[:, untouched])
    assert not torch.equal(layer.hebb[:, [2, 4]], before[:, [2, 4]])


def test_stored_trace_carries_no_graph():
    layer = make_layer().train()
    layer(torch.randn(4, IN, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1, 1, 2]))
    assert not layer.hebb.requires_grad and layer.hebb.grad_fn is None
    assert "hebb" in dict(layer.named_buffers()) and "hebb" not in dict(layer.named_parameters())


def test_eval_mode_and_missing_labels_never_change_the_trace():
    layer = make_layer()
    before = layer.hebb.clone()
    h, y = torch.randn(5, IN, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    layer.eval()
    z_eval = layer(h, y)
    assert torch.equal(layer.hebb, before)
    torch.testing.assert_close(z_eval, h @ (layer.w + layer.alpha * before))
    layer.train()
    layer(h)  # training mode without labels: inference with the current trace
    assert torch.equal(layer.hebb, before)


@pytest.mark.parametrize("training", [True, False])
def test_scripted_equals_eager(training):
    eager = make_layer()
    scripted = torch.jit.script(make_layer())
    eager.train(training)
    scripted.train(training)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        h = torch.randn(7, IN, generator=gen, dtype=torch.float64)
        y = torch.randint(0, OUT, (7,), generator=gen)
        torch.testing.assert_close(scripted(h, y), eager(h, y), rtol=0, atol=0)
        torch.testing.assert_close(scripted.hebb, eager.hebb, rtol=0, atol=0)


def test_state_dict_round_trips_the_trace():
    layer = make_layer().train()
    layer(torch.randn(6, IN, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 3, 3]))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = DHPSoftmax(IN, OUT, dtype=torch.float64)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.hebb, layer.hebb)
    assert torch.equal(restored.eta, layer.eta)


def test_factory_arguments_and_to_move_the_trace():
    layer = DHPSoftmax(IN, OUT, dtype=torch.float64)
    assert layer.hebb.dtype == layer.w.dtype == torch.float64
    layer = layer.to(torch.float32)
    assert layer.hebb.dtype == torch.float32
    logits = layer.train()(torch.randn(3, IN), torch.tensor([0, 1, 2]))
    assert logits.dtype == torch.float32 and layer.hebb.dtype == torch.float32


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    layer = DHPSoftmax(256, 10)
    assert layer.w.shape == layer.alpha.shape == layer.hebb.shape == (256, 10)
    # The authors' code: kaiming-uniform a=√5 on the (in, out) tensor, fan-in = out: bound 1/√10.
    assert 0.99 / 10 ** 0.5 < layer.w.abs().max() <= 1 / 10 ** 0.5
    assert 0 <= layer.alpha.min() and layer.alpha.max() < 0.01
    assert layer.eta.item() == pytest.approx(0.01)
    assert torch.count_nonzero(layer.hebb) == 0
    assert "in_features=256, out_features=10" in repr(layer)


def test_reset_trace_zeroes_the_trace_only():
    layer = make_layer()
    w = layer.w.clone()
    layer.reset_trace()
    assert torch.count_nonzero(layer.hebb) == 0 and torch.equal(layer.w, w)


@pytest.mark.parametrize("h_shape, y, error, words", [
    ((4, IN), torch.tensor([0, 1, 2, 6]), ValueError, "labels must be in [0, 6)"),
    ((4, IN), torch.tensor([0, -1, 2, 3]), ValueError, "labels must be in [0, 6)"),
    ((4, IN), torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "int64"),
    ((4, IN), torch.tensor([0, 1, 2], dtype=torch.int32), TypeError, "int64"),
    ((4, IN), torch.tensor([[0, 1], [2, 3]]), ValueError, "labels y must have shape (4,)"),
    ((4, IN), torch.tensor([0, 1, 2]), ValueError, "labels y must have shape (4,)"),
    ((4, IN + 1), torch.tensor([0, 1, 2, 3]), ValueError, f"h must have shape (B, {IN})"),
    ((IN,), None, ValueError, f"h must have shape (B, {IN})"),
])
def test_bad_input_names_the_problem(h_shape, y, error, words):
    layer = DHPSoftmax(IN, OUT).train()
    with pytest.raises(error) as info:
        layer(torch.randn(*h_shape), y)
    assert words in str(info.value)


def test_bad_labels_are_rejected_by_the_scripted_module_too():
    scripted = torch.jit.script(DHPSoftmax(IN, OUT))
    with pytest.raises(Exception, match=r"labels must be in \[0, 6\)"):
        scripted(torch.randn(2, IN), torch.tensor([0, 9]))


def test_network_heads_and_task_logits():
    torch.manual_seed(0)
    x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
    for dhp in (True, False):
        net = DHPNet(hidden=(32, 16), dhp=dhp).train()
        logits = net(x, y)
        assert logits.shape == (8, 10)
        scripted = torch.jit.script(DHPNet(hidden=(32, 16), dhp=dhp))
        scripted.load_state_dict(net.state_dict())
        torch.testing.assert_close(scripted.eval()(x), net.eval()(x))
    classes = torch.tensor([4, 5])
    selected = task_logits(logits, classes)
    assert torch.equal(selected, logits[:, [4, 5]])


def test_network_training_moves_plasticity_parameters():
    torch.manual_seed(0)
    net = DHPNet(hidden=(32,)).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    alpha, eta = net.head.alpha.clone(), net.head.eta.clone()
    for _ in range(5):
        x, y = torch.rand(16, 784), torch.randint(0, 10, (16,))
        loss = torch.nn.functional.cross_entropy(net(x, y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(net.head.alpha, alpha) and not torch.equal(net.head.eta, eta)
    assert torch.count_nonzero(net.head.hebb) > 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_step_matches_cpu_and_needs_no_host_sync():
    cpu = make_layer(dtype=torch.float32).train()
    gpu = make_layer(dtype=torch.float32).cuda().train()
    h = torch.randn(64, IN)
    y = torch.randint(0, OUT, (64,))
    h_gpu, y_gpu = h.cuda(), y.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z_gpu = gpu(h_gpu, y_gpu)
        z_gpu.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    z_cpu = cpu(h, y)
    torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.hebb.cpu(), cpu.hebb, rtol=1e-5, atol=1e-5)
