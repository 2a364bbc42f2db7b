r"""Training goldens: short runs of every method × head (and cohorts, the autograd and momentum
steps, the trace study's options), their final weights and metrics as digests.

For refactoring the training loop: record before the change, record after it, on the same machine
and torch, and compare; every digest must be equal (bit for bit: other hosts or BLAS builds
round differently, so the file is not compared across machines)::

    python benchmarks/training_goldens.py record before.json
    python benchmarks/training_goldens.py record after.json
    python benchmarks/training_goldens.py compare before.json after.json

Real MNIST from ``$DHP_DATA_DIR``; one thread; about a minute on a 2-core host.
"""

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from dhp_deploy.cohort import Cohort
from dhp_deploy.data import resolve_data_dir
from dhp_deploy.regularizers import METHODS
from dhp_deploy.tasks import build_benchmark
from dhp_deploy.train import TrainConfig, TrainingRun

# Two tasks of two epochs: each run crosses a consolidation and an epoch boundary.
PROTOCOL = dict(num_tasks=2, epochs=2, hidden=(32,), train_limit=256, test_limit=100,
                batch_size=32, lr=0.05, fisher_samples=64, ewc_lambda=10.0, mas_lambda=1.0,
                si_c=0.1)
# name → (configs, TrainingRun options); several configs train as one cohort.
CASES = {
    **{f"{method}-{'dhp' if dhp else 'plain'}": ([dict(method=method, dhp=dhp)], {})
       for method in METHODS for dhp in (True, False)},
    "si-dhp-autograd": ([dict(method="si")], {"lean": False}),
    "ewc-dhp-momentum": ([dict(method="ewc", momentum=0.9)], {}),
    "si-permuted-free-eta-reset": ([dict(method="si", benchmark="permuted-mnist",
                                         eta_bound=False, trace_reset=True)], {}),
    "finetune-class-incremental": ([dict(method="finetune", class_incremental=True)], {}),
    "cohort-dhp": ([dict(method=method, seed=seed) for seed, method
                    in enumerate(("finetune", "si", "online-ewc"))], {}),
    "cohort-plain": ([dict(method=method, seed=seed, dhp=False) for seed, method
                      in enumerate(("ewc", "mas"))], {}),
}


def digest(run: TrainingRun, metrics: dict) -> dict:
    state = run.model.state_dict()
    weights = hashlib.sha256()
    for name in sorted(state):
        weights.update(name.encode())
        weights.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    kept = {key: value for key, value in metrics.items() if key not in ("timings", "config")}
    kept["epoch_losses"] = [record["loss"] for record in run.progress.epochs]
    return {"weights_sha256": weights.hexdigest(),
            "metrics_sha256": hashlib.sha256(json.dumps(kept, sort_keys=True,
                                                        default=str).encode()).hexdigest(),
            "avg_acc": metrics["avg_acc"][-1] if "avg_acc" in metrics else None}


def record(out: Path) -> None:
    torch.set_num_threads(1)
    data_dir = resolve_data_dir()
    goldens = {}
    with tempfile.TemporaryDirectory() as root:
        for name, (overrides, options) in CASES.items():
            runs = []
            for index, override in enumerate(overrides):
                config = TrainConfig(**{**PROTOCOL, **override})
                benchmark = build_benchmark(**config.data_arguments(), data_dir=data_dir)
                runs.append(TrainingRun.start(config, benchmark, Path(root) / name / str(index),
                                              **options))
            outcomes = Cohort(runs).run() if len(runs) > 1 else {runs[0]: runs[0].run()}
            goldens[name] = [digest(run, outcomes[run]) for run in runs]
            print(f"{name}: {[entry['avg_acc'] for entry in goldens[name]]}", flush=True)
    goldens["_host"] = {"torch": torch.__version__}
    out.write_text(json.dumps(goldens, indent=1, sort_keys=True) + "\n")


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    cases = sorted((set(old) | set(new)) - {"_host"})
    differ = [name for name in cases if old.get(name) != new.get(name)]
    for name in cases:
        print(f"{'DIFFERS' if name in differ else 'same   '} {name}")
    print(f"{len(cases) - len(differ)} of {len(cases)} cases bit-identical")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("record").add_argument("out", type=Path)
    compared = commands.add_parser("compare")
    compared.add_argument("before", type=Path)
    compared.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
