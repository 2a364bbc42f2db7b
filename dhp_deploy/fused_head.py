r"""The lean step's fused CPU kernels (``csrc/dhp_head.cpp``, ``csrc/penalised_sgd.cpp``,
``csrc/lean_step.cpp``).

Built once per source, Python and torch version.

At batch 64 the eager DHP head is about 30 small torch ops whose dispatch (3–10 µs each) is the
cost, not their arithmetic: on a 2-core CPU, one thread, its forward + backward took 311 µs
against a plain head's 44 µs. The same arithmetic as three C++ kernels around ATen's three matmuls
takes 73 µs, which brings the DHP training step to the plain one's cost
(benchmarks/bench_layer.py measures both side by side). The cross-entropy that ends both heads'
steps (log-softmax, its gradient, the task's logits and the hit count: a dozen ops, ~80 µs) is a
fourth kernel. A fifth, ``penalised_sgd``, is the quadratic regularisers' penalty gradient and the
plain-SGD update in one pass over the weights (three memory-bound passes in torch ops), with SI's
path-integral term in the same pass. A sixth,
``lean_step``, is the whole one-process step's gradients as one call: the same ATen ops as
:func:`dhp_deploy.lean_step.python_step_gradients`, in the same order, without the Python between
them.

torch builds the extension on first use (:mod:`torch.utils.cpp_extension`: a C++ compiler and
ninja, 20-40 s on 2 cores; ``make install`` does it ahead, and :func:`load` says so before a run
when it must) and caches it. Where it cannot build, or with
``DHP_FUSED_HEAD=0``, the lean step runs the eager head, the same maths; the build failure is
warned once. The kernels run on the CPU for float32 and float64; CUDA keeps the eager head (and
CUDA graphs, which remove its launch overhead).
"""

import os
import re
import sys
import time
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["ENABLED", "ONE_CALL_STEP", "kernels", "usable", "penalty_usable"]

SOURCES = [str(Path(__file__).resolve().parent / "csrc" / name)
           for name in ("dhp_head.cpp", "penalised_sgd.cpp", "lean_step.cpp")]
# On by default; DHP_FUSED_HEAD=0 keeps the eager head (tests and benchmarks compare the two).
ENABLED = os.environ.get("DHP_FUSED_HEAD", "1") != "0"
# With the kernels, a one-process lean step runs as one C++ call (csrc/lean_step.cpp); False runs
# the same ops from Python (benchmarks/bench_layer.py measures the two side by side).
ONE_CALL_STEP = True
# torch's build lock is a file that only the builder removes: a builder killed outright (SIGKILL,
# a terminated grid worker) leaves it, and every later load would wait on it forever. A build
# takes under a minute, so a lock this old is stale.
STALE_LOCK_S = 600


def build_directory() -> Path:
    r"""Where the extension is built and cached: torch's extensions root, one folder per Python
    and torch version (an extension built against another torch would not load)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    version = re.sub(r"\W", "_", f"py{sys.version_info[0]}{sys.version_info[1]}_{torch.__version__}")
    return Path(root) / f"dhp_deploy_head_{version}"


@cache
def kernels() -> Optional[ModuleType]:
    r"""The compiled kernels (``class_stats``, ``head_forward``, ``head_backward``,
    ``cross_entropy``, ``penalised_sgd``, ``lean_step``), or None."""
    directory = build_directory()
    try:
        from torch.utils import cpp_extension
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        return cpp_extension.load("dhp_deploy_head", SOURCES, extra_cflags=["-O3"],
                                  build_directory=str(directory))
    except Exception as err:  # no compiler, no ninja, a compile error: the eager head still works
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        warnings.warn(f"dhp_deploy: the fused CPU kernels did not build ({reason}); "
                      "training uses the eager torch ops (same maths, slower)", RuntimeWarning)
        return None


def load(log: Callable[[str], None]) -> None:
    r"""Load the kernels now, before a run's clock starts, saying so when they must be compiled
    first: a first build takes 20-40 s on 2 cores, which would otherwise pass in silence inside
    the first epoch's time and throughput."""
    if not ENABLED:
        return
    if kernels.cache_info().currsize == 0 and _build_due():
        log(f"compiling the fused CPU kernels (once per source, Python and torch version; "
            f"20-40 s on 2 cores) into {build_directory()}")
    kernels()


def _build_due() -> bool:
    r"""Whether loading will compile: no built library yet, or a source newer than it (a source
    that cannot be read: loading will say why)."""
    try:
        built = [path.stat().st_mtime for path in build_directory().glob("dhp_deploy_head*.so")]
        return not built or any(Path(source).stat().st_mtime > max(built) for source in SOURCES)
    except OSError:
        return True


def usable(h: Tensor) -> bool:
    r"""Whether the lean step may run the fused kernels on activations ``h``."""
    return (ENABLED and h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64)
            and kernels() is not None)


def penalty_usable(params: list) -> bool:
    r"""Whether the penalised-SGD kernel may update ``params``: contiguous CPU tensors of one
    float dtype, on a CPU with FMA units (elsewhere its fma() would be a libm call per element)."""
    first = params[0]
    return (usable(first) and _penalty_vectorised()
            and all(p.is_contiguous() and p.dtype == first.dtype and p.device == first.device
                    for p in params))


@cache
def _penalty_vectorised() -> bool:
    return kernels().penalised_sgd_vectorised()


if __name__ == "__main__":  # `python -m dhp_deploy.fused_head`: build now (make install does)
    print("fused CPU kernels:", "built" if kernels() is not None else "not available (see warning)")
