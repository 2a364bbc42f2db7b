"""Cost of Hebbian plasticity: a full training step and the output layer alone, side by side.

    python benchmarks/bench_layer.py [--device cpu|cuda] [--iters N]

(1) the training step at batch 64 for DHPNet (784-256-256, 2-class task head as in Split MNIST)
with a DHP head and with a plain head: the lean step that dhp-train runs (``TrainingRun``'s
forward, hand-written backward and SGD update; on the CPU the DHP head's fused kernels and the
gradients as one C++ call, beside the same step with the head's eager torch ops and with the
gradients' ATen ops called from Python) and the generic autograd step (module forward,
``loss.backward()``, ``optimizer.step()``), and the lean DHP step with each regulariser's penalty
active (a first task consolidated) against finetune's; on the CPU also the step's gradients
eager (with the fused kernels) against ``torch.compile`` of the same maths; (2) the output layer
alone (forward + backward) for the vectorised DHPSoftmax, the authors' per-class loop
(dhp_deploy.layer.algorithm1_step) and a plain linear layer. All variants are timed interleaved in one process,
so machine noise hits them alike; the figure is the median over rounds. The fp32 matmul peak (1024³ torch.mm, best of 10) is measured
in the same run, with the same threads, and the lean plain step's GFLOP/s compared with it; on a
multi-core CPU also both at one thread, a grid worker's setting. On CUDA it also checks the
vectorised step makes no host sync.
"""

import argparse
import tempfile
from functools import partial

import torch

from dhp_deploy import DHPSoftmax, fused_head
from dhp_deploy.layer import algorithm1_step
from dhp_deploy.lean_step import step_gradients
from dhp_deploy.regularizers import STRENGTH_OPTION
from dhp_deploy.tasks import Benchmark, Task
from dhp_deploy.steps import OneRunSteps, target_map
from dhp_deploy.train import TrainConfig, TrainingRun
from timing import (Figures, cuda_sync, matmul_peak, median_times,
                    training_flops_per_sample)

BATCH, HIDDEN, CLASSES = 64, 256, 10
TASK_CLASSES = (0, 1)  # a Split MNIST task head


def timing_task(x, y, device) -> tuple:
    r"""``(benchmark, head, targets_of)``: one Split-MNIST-like task on the batch ``(x, y)``."""
    task = Task(0, TASK_CLASSES, x, y, x[:0], y[:0], x, y)
    benchmark = Benchmark("timing", [task], "task", 0, CLASSES, x.shape[1])
    head = torch.tensor(TASK_CLASSES, device=device)
    return benchmark, head, target_map(head, CLASSES, device)


def training_steps(dhp: bool, x, y, device) -> tuple:
    r"""(lean step, autograd step) of a fresh ``TrainingRun``, as dhp-train takes them."""
    config = TrainConfig(dhp=dhp, hidden=(HIDDEN, HIDDEN))
    benchmark, head, targets_of = timing_task(x, y, device)
    steps = []
    for lean in (True, False):
        run = TrainingRun(config, benchmark, tempfile.gettempdir(), device, lean=lean)
        steps.append(partial(OneRunSteps(run).step, x, y, head, targets_of))
    return tuple(steps)


REGULARISERS = tuple(STRENGTH_OPTION)  # every registered method with a penalty


def regularised_steps(x, y, device) -> dict:
    r"""The lean DHPNet step with each regulariser's penalty active: a first task consolidated on
    ``x`` (importances and anchors set), then the second task's steps, as dhp-train takes them."""
    benchmark, head, targets_of = timing_task(x, y, device)
    steps = {}
    for method in REGULARISERS:
        run = TrainingRun(TrainConfig(dhp=True, method=method, hidden=(HIDDEN, HIDDEN)),
                          benchmark, tempfile.gettempdir(), device)
        run.regularizer.before_task(run.model)
        OneRunSteps(run).step(x, y, head, targets_of)
        run.regularizer.after_task(run.model, x, head, torch.Generator().manual_seed(0))
        run.regularizer.before_task(run.model)
        steps[f"DHPNet + {method} step (lean)"] = \
            partial(OneRunSteps(run).step, x, y, head, targets_of)
    return steps


def with_kernel_setting(step, setting: str, value: bool):
    r"""``step`` run with ``fused_head.<setting>`` (``ENABLED``: False runs the DHP head's eager
    torch ops; ``ONE_CALL_STEP``: False computes the gradients from Python, the same ATen ops
    as the one C++ call) set to ``value``, and restored after."""
    def run():
        kept = getattr(fused_head, setting)
        setattr(fused_head, setting, value)
        try:
            step()
        finally:
            setattr(fused_head, setting, kept)
    return run


def compiled_gradients(x, y, device) -> dict:
    r"""The lean step's gradients alone (no update), eager (with the fused kernels on the CPU)
    and through ``torch.compile`` of the same maths (``lean_step.step_gradients``; the fused
    kernels are opaque to it, so it compiles the eager ops): what the compiler buys here."""
    benchmark, head, targets_of = timing_task(x, y, device)
    targets, fused = targets_of.index_select(0, y), fused_head.usable(x)
    steps = {}
    for dhp, name in ((True, "DHPNet"), (False, "plain net")):
        model = TrainingRun(TrainConfig(dhp=dhp, hidden=(HIDDEN, HIDDEN)), benchmark,
                            tempfile.gettempdir(), device).model
        params, hebb = list(model.parameters()), model.head.hebb if dhp else None

        def gradients(fused=fused, params=params, hebb=hebb):
            return step_gradients(params, hebb, x, y, head, targets, BATCH, fused=fused)
        compiled = torch.compile(partial(gradients, fused=False))
        compiled()  # compiles (tens of seconds on 2 cores), outside the timing
        steps[f"{name} gradients (eager)"] = gradients
        steps[f"{name} gradients (torch.compile)"] = compiled
    return steps


def one_thread_share(step, args) -> dict:
    r"""``step``'s GFLOP/s on one thread and the one-thread torch.mm peak, measured one after the
    other: what each one-thread process of a grid (``reproduce.py``'s choice on a CPU) reaches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = median_times({"step": step}, args.iters, args.rounds)["step"]
        peak = matmul_peak(1024, 10, engines=("torch.mm",))["peak"]
    finally:
        torch.set_num_threads(threads)
    return {"step_s": seconds, "gflops": step_gflop() / seconds, "peak_gflops": peak}


def step_gflop() -> float:
    return BATCH * training_flops_per_sample((784, HIDDEN, HIDDEN, CLASSES))["nominal"] / 1e9


def layer_steps(device, gen):
    h = torch.randn(BATCH, HIDDEN, device=device, requires_grad=True)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)
    dhp = DHPSoftmax(HIDDEN, CLASSES, device=device).train()
    linear = torch.nn.Linear(HIDDEN, CLASSES, bias=False, device=device)
    hebb = torch.zeros(HIDDEN, CLASSES, device=device)

    def vectorised():
        dhp(h, y).sum().backward()

    def loop():
        z, _ = algorithm1_step(hebb, h, y, dhp.eta, dhp.w, dhp.alpha)
        z.sum().backward()

    def plain():
        linear(h).sum().backward()
    return {"DHP layer (vectorised)": vectorised, "DHP layer (Algorithm-1 loop)": loop,
            "linear layer": plain}, vectorised


def check_no_host_sync(step):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none (torch.cuda.set_sync_debug_mode('error') passed)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the key figures and times here")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile comparison (CPU; it compiles for ~20 s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 on a busy shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.rand(BATCH, 784, generator=gen).to(device)
    y = torch.tensor(TASK_CLASSES)[torch.randint(0, 2, (BATCH,), generator=gen)].to(device)
    steps = {}
    for dhp, name in ((True, "DHPNet"), (False, "plain net")):
        steps[f"{name} step (lean)"], steps[f"{name} step (autograd)"] = \
            training_steps(dhp, x, y, device)
    if fused_head.usable(x):
        steps["DHPNet step (lean, eager head)"] = with_kernel_setting(
            steps["DHPNet step (lean)"], "ENABLED", False)
        for name in ("DHPNet", "plain net"):
            steps[f"{name} step (lean, Python step)"] = with_kernel_setting(
                steps[f"{name} step (lean)"], "ONE_CALL_STEP", False)
    steps.update(regularised_steps(x, y, device))
    layers, vectorised = layer_steps(device, gen)
    times = median_times({**steps, **layers}, args.iters, args.rounds, cuda_sync(device))
    if device.type == "cpu" and not args.no_compile:
        # After the figures above, never interleaved with them: inductor's kernels bring their
        # own OpenMP runtime, whose spinning threads slowed the eager steps beside them.
        times.update(median_times(compiled_gradients(x, y, device), args.iters, args.rounds))
    peak = matmul_peak(1024, 10, device, engines=("torch.mm",))["peak"]

    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"batch {BATCH}, median of {args.rounds} rounds x {args.iters} calls")
    for name, seconds in times.items():
        print(f"  {name:30s} {seconds * 1e6:9.1f} us")
    figures = Figures()
    figures.data = {"device": str(device), "times_s": times, "peak_gflops": peak}
    for step in ("lean", "autograd"):
        ratio = times[f"DHPNet step ({step})"] / times[f"plain net step ({step})"]
        figures.key(f"DHP / plain full step ({step}) {ratio:6.3f}   (target <= 1.10)")
    if "DHPNet step (lean, eager head)" in times:
        ratio = times["DHPNet step (lean, eager head)"] / times["plain net step (lean)"]
        figures.key(f"DHP / plain full step (lean, eager head instead of the fused kernels) "
                    f"{ratio:6.3f}")
    for name in ("DHPNet", "plain net"):
        if f"{name} step (lean, Python step)" in times:
            ratio = times[f"{name} step (lean)"] / times[f"{name} step (lean, Python step)"]
            figures.key(f"{name} lean step, gradients in one C++ call / from Python  {ratio:6.3f}")
    for method in REGULARISERS:
        ratio = times[f"DHPNet + {method} step (lean)"] / times["DHPNet step (lean)"]
        figures.key(f"{method} + DHP / finetune + DHP step (lean) {ratio:6.3f}   "
                    f"(target <= 1.30)")
    for name in ("DHPNet", "plain net"):
        figures.key(f"{name} autograd / lean step    "
                    f"{times[f'{name} step (autograd)'] / times[f'{name} step (lean)']:6.2f}")
    achieved = step_gflop() / times["plain net step (lean)"]
    figures.key(f"plain lean step {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the "
                f"{peak:.0f} GFLOP/s torch.mm peak measured here (target >= 50%; nominal "
                f"{step_gflop() * 1e3:.1f} MFLOP per step)")
    if device.type == "cpu" and torch.get_num_threads() > 1:
        one_thread = one_thread_share(steps["plain net step (lean)"], args)
        figures.data["one_thread"] = one_thread
        figures.key(f"plain lean step at one thread (a grid worker's setting) "
                    f"{one_thread['gflops']:.1f} GFLOP/s = "
                    f"{100 * one_thread['gflops'] / one_thread['peak_gflops']:.0f}% of the "
                    f"{one_thread['peak_gflops']:.0f} GFLOP/s one-thread torch.mm peak measured "
                    f"here (target >= 50%)")
    for name in ("DHPNet", "plain net"):
        if f"{name} gradients (torch.compile)" in times:
            ratio = (times[f"{name} gradients (torch.compile)"]
                     / times[f"{name} gradients (eager)"])
            figures.key(f"{name} gradients, torch.compile / eager with the fused kernels "
                        f"{ratio:6.3f}   (< 1: the compiler wins)")
    loop_ratio = times["DHP layer (Algorithm-1 loop)"] / times["DHP layer (vectorised)"]
    figures.key(f"loop / vectorised layer   {loop_ratio:6.2f}   (target >= 5)")
    figures.key(f"DHP / linear layer alone  "
                f"{times['DHP layer (vectorised)'] / times['linear layer']:6.2f}")
    if device.type == "cuda":
        print(f"host syncs in the vectorised step: {check_no_host_sync(vectorised)}")
        print(f"host syncs in the lean DHPNet step: "
              f"{check_no_host_sync(steps['DHPNet step (lean)'])}")
        compare_cuda_graphs(steps, args, figures)
    figures.write(args.json)


def graphed(step):
    r"""``step`` captured once as a CUDA graph (its input tensors static); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def compare_cuda_graphs(steps: dict, args, figures) -> None:
    r"""The lean step eager vs replayed as one CUDA graph (a batch-64 step is launch-bound)."""
    for name in ("DHPNet", "plain net"):
        eager = steps[f"{name} step (lean)"]
        try:
            replay = graphed(eager)
        except RuntimeError as err:
            print(f"{name} lean step: not capturable as a CUDA graph ({str(err).splitlines()[0]})")
            continue
        times = median_times({"eager": eager, "graph": replay}, args.iters, args.rounds,
                             torch.cuda.synchronize)
        figures.key(f"{name} lean step: eager {times['eager'] * 1e6:.1f} us, CUDA graph "
                    f"{times['graph'] * 1e6:.1f} us ({times['eager'] / times['graph']:.2f}x)")


if __name__ == "__main__":
    main()
