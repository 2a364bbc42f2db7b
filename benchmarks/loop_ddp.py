r"""gloo teardown under repetition: the 2-rank scenario of tests/test_distributed.py, N times,
counting the ranks that died with a signal instead of exiting.

    python benchmarks/loop_ddp.py                  # 100 runs of 2 ranks (~10 s each on 2 cores)
    python benchmarks/loop_ddp.py --runs 10        # a quick look

Each run is one task of Split MNIST (1 epoch on 1984 images, DHP head off, 1 thread per rank), as
``test_the_synchronised_trace_is_what_makes_ranks_agree`` trains it, with the two ranks started
by hand (the torchrun variables set per process, a fresh port each run) so that every rank's own
exit status is seen: torchrun would turn a rank's signal into its own exit status 1. A rank that
dies in gloo's teardown (destroy_process_group, interpreter exit) shows as a negative return code
(-6 SIGABRT, -11 SIGSEGV); one line per such rank, with its stderr's last line, then a summary.
Exit status 1 if any rank died with a signal or failed.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ["--benchmark", "split-mnist", "--method", "finetune", "--num-tasks", "1",
            "--epochs", "1", "--train-limit", "1984", "--test-limit", "100", "--threads", "1",
            "--quiet"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_run(out_dir: Path, data_dir, timeout_s: float) -> list:
    r"""Two ranks of one training run; ``[(return code, stderr), ...]`` by rank (None: hung)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env.pop("DHP_TRAIN_FAULT", None)
    if data_dir:
        env["DHP_DATA_DIR"] = str(data_dir)
    command = [sys.executable, "-m", "dhp_deploy.cli.train", *SCENARIO, "--out", str(out_dir)]
    ranks = [subprocess.Popen(command, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    results = []
    deadline = time.monotonic() + timeout_s
    for rank in ranks:
        try:
            _, stderr = rank.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((rank.returncode, stderr))
        except subprocess.TimeoutExpired:
            rank.kill()
            _, stderr = rank.communicate()
            results.append((None, stderr))
    return results


def describe(code) -> str:
    if code is None:
        return "hung (killed after the timeout)"
    if code < 0:
        return f"died with {signal.Signals(-code).name}"
    return f"exited {code}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="2-rank runs (default 100)")
    parser.add_argument("--data-dir", default=os.environ.get("DHP_DATA_DIR"),
                        help="MNIST root (default $DHP_DATA_DIR)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args = parser.parse_args()
    outcomes, started = Counter(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loop-ddp-") as tmp:
        for run in range(args.runs):
            for rank, (code, stderr) in enumerate(one_run(Path(tmp) / f"run{run}", args.data_dir,
                                                          args.timeout)):
                outcomes[describe(code)] += 1
                if code != 0:
                    last = (stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
                    print(f"run {run + 1} rank {rank}: {describe(code)}: {last}", flush=True)
            if (run + 1) % 10 == 0:  # partial counts survive an interrupted loop
                print(f"after {run + 1} runs ({time.monotonic() - started:.0f} s): "
                      f"{dict(outcomes)}", flush=True)
    signalled = sum(n for what, n in outcomes.items() if what.startswith("died"))
    print(f"{args.runs} runs x 2 ranks in {time.monotonic() - started:.0f} s: "
          f"{signalled} rank(s) died with a signal; "
          + ", ".join(f"{what}: {n}" for what, n in sorted(outcomes.items())))
    return 0 if outcomes == Counter({"exited 0": 2 * args.runs}) else 1


if __name__ == "__main__":
    sys.exit(main())
