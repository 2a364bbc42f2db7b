"""Cost of Hebbian plasticity: a full training step and the output layer alone, side by side.

    python benchmarks/bench_layer.py [--device cpu|cuda] [--iters N]

(1) forward + backward + SGD step at batch 64 for DHPNet (784-256-256, DHP head) and the same
network with a plain linear head; (2) the output layer alone (forward + backward) for the
vectorised DHPSoftmax, the authors' per-class loop (tests/oracle.py) and a plain linear layer.
All variants are timed interleaved in one process, so machine noise hits them alike; the figure
is the median over rounds. On CUDA it also checks the vectorised step makes no host sync.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import algorithm1_step  # noqa: E402

from dhp_deploy import DHPNet, DHPSoftmax  # noqa: E402

BATCH, HIDDEN, CLASSES = 64, 256, 10


def timer(device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    return sync


def median_times(fns: dict, iters: int, rounds: int, sync) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds."""
    samples = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        for _ in range(10):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) for name, s in samples.items()}


def full_step(net, x, y):
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step():
        loss = F.cross_entropy(net(x, y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 on a busy shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.rand(BATCH, 784, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)
    steps = {"DHPNet step": full_step(DHPNet(dhp=True, device=device).train(), x, y),
             "plain net step": full_step(DHPNet(dhp=False, device=device).train(), x, y)}
    layers, vectorised = layer_steps(device, gen)
    times = median_times({**steps, **layers}, args.iters, args.rounds, timer(device))

    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"batch {BATCH}, median of {args.rounds} rounds x {args.iters} calls")
    for name, seconds in times.items():
        print(f"  {name:30s} {seconds * 1e6:9.1f} us")
    step_ratio = times["DHPNet step"] / times["plain net step"]
    loop_ratio = times["DHP layer (Algorithm-1 loop)"] / times["DHP layer (vectorised)"]
    print(f"DHP / plain full step     {step_ratio:6.3f}   (target <= 1.10)")
    print(f"loop / vectorised layer   {loop_ratio:6.2f}   (target >= 5)")
    print(f"DHP / linear layer alone  "
          f"{times['DHP layer (vectorised)'] / times['linear layer']:6.2f}")
    if device.type == "cuda":
        print(f"host syncs in the vectorised step: {check_no_host_sync(vectorised)}")


if __name__ == "__main__":
    main()
