r"""What the trace is good for once deployed: online adaptation through a plastic bundle.

    python benchmarks/adaptation.py RUN_DIR [RUN_DIR ...] [--out docs/results/adaptation]

For each finished DHP run: export it with ``dhp-export --plastic`` (TorchScript), open the bundle
with :class:`dhp_deploy.PlasticSession` (what a server runs) and feed it labelled streams,
predict-then-learn in calls of ``--call`` rows: every row is predicted with the trace as it is,
then the call's labels move the trace. Streams (``--stream`` rows each, drawn from test sets):

- ``last task``: the task the model learned last (its permutation);
- ``first task``: the first task (the most forgotten one);
- ``new permutation``: MNIST under a permutation the model never saw (seeded apart from the
  benchmark's).

Against each stream the frozen reference: the same bundle predicting only (the exported trace
never moves). After the new-permutation stream, every learned task's full test set is scored with
the adapted trace and with the exported one: what adapting to the new task cost the others.
Each run leaves ``<out>/<benchmark>/<protocol>/<variant>/seed<k>.json`` (kind
``dhp-adaptation``), which ``results.py`` turns into the report's table and plot.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkout.py beside us
import checkout  # noqa: E402  (this checkout's dhp_deploy, then the reproduction package)
from dhp_deploy.run_dir import METRICS_NAME, atomic_write_json, read_config  # noqa: E402
from reproduction.naming import ADAPTATION_KIND, protocol_tag, training_variant  # noqa: E402
from reproduction.records import REPO  # noqa: E402

STREAM_SEED = 20261204  # the stream order and the unseen permutation: apart from every grid seed


def export_plastic(run_dir: Path, out: Path, data_dir) -> Path:
    result = subprocess.run([sys.executable, "-m", "dhp_deploy.cli.export", str(run_dir),
                             "--plastic", "--format", "torchscript", "--out", str(out),
                             "--data-dir", str(data_dir)],
                            capture_output=True, text=True, env=checkout.child_environment())
    if result.returncode != 0:
        raise SystemExit(f"error: dhp-export failed for {run_dir}: {result.stderr.strip()}")
    return out


def stream_accuracy(session, x: np.ndarray, y: np.ndarray, call: int, learn: bool) -> list:
    r"""Per row, whether its prediction (made before its call's labels are learned) was right."""
    hits = []
    for start in range(0, len(y), call):
        xb, yb = x[start:start + call], y[start:start + call]
        logits = session.step(xb, yb) if learn else session.predict(xb)
        hits += (logits.argmax(1) == yb).tolist()
    return hits


def task_accuracies(session, tasks) -> list[float]:
    return [float(np.mean(np.concatenate([session.predict(x[i:i + 1000]).argmax(1)
                                          for i in range(0, len(y), 1000)]) == y))
            for x, y in tasks]


def measure(run_dir: Path, data_dir, stream: int, call: int) -> dict:
    import torch

    from dhp_deploy.plastic_session import PlasticSession
    from dhp_deploy.tasks import build_benchmark
    from dhp_deploy.config import TrainConfig

    config = read_config(run_dir)
    benchmark = build_benchmark(**TrainConfig.from_json(config).data_arguments(),
                                data_dir=data_dir)
    generator = torch.Generator().manual_seed(STREAM_SEED)
    tests = [(t.x_test.numpy(), t.y_test.numpy()) for t in benchmark.tasks]
    unseen = torch.randperm(benchmark.input_size, generator=generator).numpy()
    identity_x, identity_y = tests[0]  # task 1 is the identity permutation
    streams = {"last task": tests[-1], "first task": tests[0],
               "new permutation": (identity_x[:, unseen], identity_y)}
    order = torch.randperm(len(identity_y), generator=generator).numpy()[:stream]
    with tempfile.TemporaryDirectory() as tmp:
        session = PlasticSession(export_plastic(run_dir, Path(tmp) / "bundle", data_dir),
                                 "torchscript")
        results = {}
        for name, (x, y) in streams.items():
            x, y = np.ascontiguousarray(x[order]), np.ascontiguousarray(y[order])
            session.reset()
            frozen = stream_accuracy(session, x, y, call, learn=False)
            plastic = stream_accuracy(session, x, y, call, learn=True)
            results[name] = {"frozen": float(np.mean(frozen)), "plastic": float(np.mean(plastic)),
                             "frozen_curve": _running(frozen), "plastic_curve": _running(plastic),
                             "max_abs_hebb_after": float(np.abs(session.hebb).max())}
            if name == "new permutation":
                adapted = task_accuracies(session, tests)
                session.reset()
                results[name]["learned_tasks_before"] = task_accuracies(session, tests)
                results[name]["learned_tasks_after"] = adapted
    return {"kind": ADAPTATION_KIND, "benchmark": config["training"]["benchmark"],
            "protocol": protocol_tag(config["training"]),
            "variant": training_variant(config["training"]), "seed": config["training"]["seed"],
            "run_dir": str(run_dir), "stream": stream, "call": call, "stream_seed": STREAM_SEED,
            "streams": results}


def _running(hits: list, window: int = 200) -> list[float]:
    r"""Accuracy over consecutive windows of the stream (the plot's curve)."""
    return [float(np.mean(hits[i:i + window])) for i in range(0, len(hits), window)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished DHP run directories")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "adaptation")
    parser.add_argument("--data-dir", default=None, help="MNIST root (default $DHP_DATA_DIR)")
    parser.add_argument("--stream", type=int, default=2000, help="rows per stream (default 2000)")
    parser.add_argument("--call", type=int, default=10, help="rows per call (default 10)")
    args = parser.parse_args(argv)
    import os

    data_dir = args.data_dir or os.environ.get("DHP_DATA_DIR", "data")
    for run_dir in args.runs:
        if not (run_dir / METRICS_NAME).exists() or not read_config(run_dir)["training"]["dhp"]:
            print(f"skipped {run_dir}: not a finished DHP run", file=sys.stderr)
            continue
        record = measure(run_dir, data_dir, args.stream, args.call)
        path = (args.out / record["benchmark"] / record["protocol"] / record["variant"]
                / f"seed{record['seed']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        summary = "; ".join(f"{name}: frozen {100 * r['frozen']:.1f}% → plastic "
                            f"{100 * r['plastic']:.1f}%" for name, r in record["streams"].items())
        print(f"{path}: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
