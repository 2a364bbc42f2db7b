r"""A training step replayed as one CUDA graph.

At batch 64 a step of our networks is a few dozen small kernels, and on a GPU their launches, not
their arithmetic, set the pace: measured on an H100, the lean DHPNet step took 1.28 ms eagerly and
0.14 ms replayed as a CUDA graph (benchmarks/bench_layer.py). A graph records the step's kernels
once, on fixed input buffers, and replays them with one launch.

What makes a step capturable, and what the training loop guarantees: no host sync (tested with
``torch.cuda.set_sync_debug_mode("error")``); every tensor the step reads or writes stays at one
address between replays (the parameters and optimiser state are updated in place, the DHP trace
is written back into its buffer, the regulariser's state is only replaced at task boundaries, when
the loop captures anew); one batch shape (the epoch's shorter last batch runs eagerly).
"""

from typing import Callable, Hashable

import torch
from torch import Tensor

__all__ = ["GraphedStep", "GraphedSteps", "warm_up"]


class GraphedStep:
    r"""``step(x, y) -> tensors``, captured on static copies of ``(x, y)`` and replayed.

    Capture only records kernels; the first call (like every later one) copies its batch into the
    static inputs and replays, so each call is exactly one training step. The returned tensors
    are the graph's static outputs: read them before the next call.
    """

    def __init__(self, step: Callable[[Tensor, Tensor], tuple], x: Tensor, y: Tensor) -> None:
        self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.step = step  # keeps what the step closes over (and the graph reads) alive
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(self.x, self.y)

    def __call__(self, x: Tensor, y: Tensor) -> tuple:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.outputs


def warm_up(step: Callable[[Tensor, Tensor], tuple], x: Tensor, y: Tensor) -> tuple:
    r"""Run ``step`` once eagerly on a side stream, as capture requires of a step's first run
    (lazy library set-up must not happen during capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outputs = step(x, y)
    torch.cuda.current_stream().wait_stream(side)
    return outputs


class GraphedSteps:
    r"""A training loop's steps replayed as CUDA graphs, one graph per ``key`` (a task).

    A key's first full batch runs eagerly on a side stream (capture's warm-up), its second is
    captured and replayed, and so is every later one; shorter batches (an epoch's last) run
    eagerly, as does everything when ``enabled`` is False. A capture that fails is reported
    through ``log`` once, and the loop goes on with eager steps. :meth:`clear` forgets the graphs
    (when what a step reads moves to new tensors, e.g. a regulariser's state at a task's start).
    """

    def __init__(self, enabled: bool, batch_size: int, log: Callable[[str], None]) -> None:
        self.enabled, self.batch_size, self.log = enabled, batch_size, log
        self.captured: dict = {}  # key → "warm" after its eager first step, then its GraphedStep

    def clear(self) -> None:
        self.captured.clear()

    def __call__(self, key: Hashable, step: Callable[[Tensor, Tensor], tuple], x: Tensor,
                 y: Tensor) -> tuple:
        if not self.enabled or y.shape[-1] != self.batch_size:
            return step(x, y)
        graphed = self.captured.get(key)
        if graphed is None:
            self.captured[key] = "warm"
            return warm_up(step, x, y)
        if graphed == "warm":
            try:
                graphed = self.captured[key] = GraphedStep(step, x, y)
            except RuntimeError as err:  # capture records, never runs: nothing was trained
                self.log(f"CUDA graph capture failed ({str(err).splitlines()[0][:160]}); "
                         f"training on with eager steps")
                self.enabled = False
                return step(x, y)
        return graphed(x, y)
