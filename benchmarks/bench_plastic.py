r"""Plastic inference cost: one predict-then-learn call against the frozen model's call.

    python benchmarks/bench_plastic.py            # 784-256-256-10, random weights and trace

The frozen model (trace folded into the head) and the plastic model (trace in, trace out, the
Hebbian update on the labelled rows) of the same network, both as TorchScript and as ONNX
(onnxruntime, CPU), one thread each by default, timed call by call interleaved at batch 1 and
batch 64 (all rows labelled):
median latency per call and the plastic / frozen ratio per backend. The plastic call does more
(the trace's update and its copy in and out), so a ratio above 1 is expected; this measures how
much. Times are wall clock on whatever else the machine is doing.

    python benchmarks/bench_plastic.py --session BUNDLE   # also: the cost of the session's lock

With ``--session`` (a plastic bundle, ``dhp-export RUN --plastic``), the cost of the lock that
makes a shared PlasticSession safe: batch-1 predict-then-learn calls per second through
``session.step`` (the lock taken uncontended) against the same call's unlocked core
(``session._step``, what step ran before the lock: not safe to share), and the total calls per
second of 2 and 4 threads sharing the one session (they take turns: the lock serialises them).
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dhp_deploy.bundle_kinds import PLASTIC
from dhp_deploy.formats import write_onnx, write_torchscript
from dhp_deploy.frozen import fold_model
from dhp_deploy.network import DHPNet
from dhp_deploy.plastic import plastic_model
from timing import Figures, median_times


def backends(model: DHPNet, directory: Path) -> dict:
    r"""``{(backend, kind): call(x, labels, hebb)}`` for the frozen and the plastic model."""
    import onnxruntime as ort

    frozen, plastic = fold_model(model), plastic_model(model)
    write_torchscript(frozen, directory / "frozen.ts")
    write_torchscript(plastic, directory / "plastic.ts")
    write_onnx(frozen, directory / "frozen.onnx")
    write_onnx(plastic, directory / "plastic.onnx", PLASTIC)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as TorchScript
    sessions = {kind: ort.InferenceSession(str(directory / f"{kind}.onnx"), sess_options=options,
                                           providers=["CPUExecutionProvider"])
                for kind in ("frozen", "plastic")}
    scripted = {kind: torch.jit.load(str(directory / f"{kind}.ts")).eval()
                for kind in ("frozen", "plastic")}

    def ts_frozen(x, labels, hebb):
        with torch.inference_mode():
            return scripted["frozen"](torch.from_numpy(x)).numpy()

    def ts_plastic(x, labels, hebb):
        with torch.inference_mode():
            logits, hebb_out = scripted["plastic"](torch.from_numpy(x), torch.from_numpy(labels),
                                                   torch.from_numpy(hebb))
        return logits.numpy(), hebb_out.numpy()

    def ort_frozen(x, labels, hebb):
        return sessions["frozen"].run(["logits"], {"input": x})[0]

    def ort_plastic(x, labels, hebb):
        return sessions["plastic"].run(["logits", "hebb_out"],
                                       {"input": x, "labels": labels, "hebb": hebb})

    return {("torchscript", "frozen"): ts_frozen, ("torchscript", "plastic"): ts_plastic,
            ("onnx", "frozen"): ort_frozen, ("onnx", "plastic"): ort_plastic}


def lock_cost(bundle: Path, calls: int, rounds: int, figures: Figures) -> None:
    r"""Calls/s of a PlasticSession's locked step against its unlocked core, alone and shared."""
    from dhp_deploy.plastic_session import PlasticSession
    from dhp_deploy.runtime import check_input

    x = np.load(bundle / "golden_inputs.npy")[:1]
    labels = np.array([int(np.load(bundle / "golden_stream_labels.npy")[0]) % 10], np.int64)
    figures.key(f"{'backend':<12}{'unlocked /s':>12}{'locked /s':>11}{'lock us':>9}"
                f"{'2 threads /s':>14}{'4 threads /s':>14}")
    for backend in ("torchscript", "onnx", "pt2"):
        try:
            session = PlasticSession(bundle, backend=backend, threads=1)
        except Exception as err:  # an artifact this bundle lacks or this host cannot load
            figures.key(f"{backend:<12}skipped ({str(err)[:80]})")
            continue

        def unlocked():  # step's checks and the call, without the lock
            session._step(check_input(x, session.in_features), session._check_labels(labels, 1))

        def locked():
            session.step(x, labels)

        times = median_times({"unlocked": unlocked, "locked": locked}, calls, rounds)
        shared = {n: _shared_rate(session, x, labels, n, calls) for n in (2, 4)}
        rates = {name: 1 / seconds for name, seconds in times.items()}
        figures.key(f"{backend:<12}{rates['unlocked']:>12,.0f}{rates['locked']:>11,.0f}"
                    f"{(times['locked'] - times['unlocked']) * 1e6:>9.2f}"
                    f"{shared[2]:>14,.0f}{shared[4]:>14,.0f}")
        figures.data[f"lock {backend}"] = {"unlocked_per_s": rates["unlocked"],
                                           "locked_per_s": rates["locked"],
                                           "threads_2_per_s": shared[2],
                                           "threads_4_per_s": shared[4]}


def _shared_rate(session, x, labels, threads: int, calls: int) -> float:
    r"""Total calls/s of ``threads`` threads making ``calls`` step calls each on one session."""
    start = threading.Barrier(threads + 1)

    def worker():
        start.wait()
        for _ in range(calls):
            session.step(x, labels)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    return threads * calls / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--iters", type=int, default=300, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and onnxruntime alike (default 1: steadier "
                             "ratios on a shared machine)")
    parser.add_argument("--json", help="also write the key figures and numbers here")
    parser.add_argument("--session", type=Path,
                        help="a plastic bundle: also time its PlasticSession's lock")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DHPNet(hidden=tuple(int(w) for w in args.hidden.split(",")), dhp=True).eval()
    with torch.no_grad():
        model.head.hebb.uniform_(0, 1)
    hebb = model.head.hebb.numpy().copy()
    rng = np.random.default_rng(0)
    figures = Figures()
    figures.key(f"{'backend':<12}{'batch':>6}{'frozen us':>11}{'plastic us':>12}"
                f"{'plastic / frozen':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        calls = backends(model, Path(tmp))
        for batch in (1, 64):
            x = rng.random((batch, model.trunk[0].in_features), dtype=np.float32)
            labels = rng.integers(0, model.head.out_features, batch).astype(np.int64)
            functions = {key: (lambda call=call: call(x, labels, hebb))
                         for key, call in calls.items()}
            times = median_times(functions, args.iters, args.rounds)
            for backend in ("torchscript", "onnx"):
                frozen, plastic = times[(backend, "frozen")], times[(backend, "plastic")]
                figures.key(f"{backend:<12}{batch:>6}{frozen * 1e6:>11.1f}{plastic * 1e6:>12.1f}"
                            f"{plastic / frozen:>18.2f}")
                figures.data[f"{backend} batch {batch}"] = {"frozen_s": frozen,
                                                            "plastic_s": plastic}
    if args.session:
        lock_cost(args.session, args.iters, args.rounds, figures)
    figures.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
