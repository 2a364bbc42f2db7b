r"""Run records: the JSON summary of a finished run, writing and finding summaries."""

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from dhp_deploy.layer import DHPSoftmax
from dhp_deploy.config import TrainConfig, build_model
from dhp_deploy.run_dir import (CONFIG_NAME, METRICS_NAME, atomic_write_json, load_checkpoint,
                                read_config)
from reproduction.naming import (ADAPTATION_KIND, DIVERGED_NAME, SUMMARY_KIND, SUMMARY_VERSION,
                                 protocol_tag, record_suffix, train_command,
                                 training_variant)

REPO = Path(__file__).resolve().parents[2]  # the repository root
# A DHP run's trace diagnostics in metrics.json (dhp_deploy.train.Progress), as summaries keep them.
TRACE_FIELDS = ("acc_matrix_trace_zeroed", "acc_matrix_own_trace", "trace_diagnostics")


def machine(device: str = "cpu") -> dict:
    r"""CPU model, logical cores, torch version and threads of this host; the GPU's name when
    ``device`` is a CUDA device."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": (torch.cuda.get_device_name(torch.device(device))
                       if torch.device(device).type == "cuda" else "cpu")}


def summarize_run(run_dir, command: str | None = None, device: str = "cpu",
                  setting: dict | None = None) -> dict:
    r"""The JSON summary of a finished ``dhp-train`` run directory (config, seed, commit, metrics).

    A run that diverged (``diverged.json``, no ``metrics.json``) gets ``metrics: null`` and
    ``diverged: {error, ...}``: a result the report counts, with no accuracy.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    diverged = None
    if (run_dir / METRICS_NAME).exists():
        metrics = json.loads((run_dir / METRICS_NAME).read_text())
    else:
        diverged = json.loads((run_dir / DIVERGED_NAME).read_text())
        last_good = load_checkpoint(run_dir)
        progress = last_good["metrics"]
        metrics = {"acc_matrix": progress["acc_matrix"], "timings": progress["timings"]}
        diverged["last_good_plastic_heads"] = plastic_heads(last_good["model"], config)
        # What the trace did up to the last good checkpoint (DHP runs with the diagnostics).
        diverged["last_good"] = {name: progress.get(name)
                                 for name in ("acc_matrix", *TRACE_FIELDS)}
    provenance_path = run_dir / "provenance.json"
    provenance = (json.loads(provenance_path.read_text()) if provenance_path.exists()
                  else {"role": "grid", "sessions": []})
    training = config["training"]
    val_matrix = _val_matrix(run_dir) if training.get("val_fraction") and not diverged else None
    timings = metrics["timings"]
    first = provenance["sessions"][0] if provenance["sessions"] else {}
    last_file = run_dir / (METRICS_NAME if diverged is None else DIVERGED_NAME)
    finished = datetime.fromtimestamp(last_file.stat().st_mtime, timezone.utc)
    return {
        "kind": SUMMARY_KIND,
        "version": SUMMARY_VERSION,
        "role": provenance["role"],
        "benchmark": training["benchmark"],
        "variant": training_variant(training) + record_suffix(run_dir.parent.name),
        "method": training["method"],
        "dhp": training["dhp"],
        "seed": training["seed"],
        "protocol": protocol_tag(training),
        "commit": first.get("commit"),
        "dirty": first.get("dirty", []),
        "sessions": provenance["sessions"],
        "finished_at": finished.isoformat(timespec="seconds"),
        "run_dir": _relative(run_dir),
        "command": command or train_command(training),
        "machine": machine(device),
        "setting": setting,  # the grid's processes and stack size ({"jobs": N, "cohort": K})
        "diverged": diverged,
        "metrics": None if diverged else {
            "acc_matrix": metrics["acc_matrix"], "avg_acc": metrics["avg_acc"],
            "acc": metrics["acc"], "bwt": metrics["bwt"], "forgetting": metrics["forgetting"],
            "val_acc_matrix": val_matrix,
            "val_avg_acc": _averages(val_matrix) if val_matrix else None,
            "plasticity": metrics.get("plasticity"),
            **{name: metrics.get(name) for name in TRACE_FIELDS},
        },
        "timings": timings,
        "wall_s": (timings["train_s"] + timings["consolidate_s"] + timings["evaluate_s"]
                   + timings.get("trace_diagnostics_s", 0.0)),
        "config": config,
    }


def plastic_heads(state: dict, config: dict) -> list[dict]:
    r"""η and max |Hebb| of each DHP head in a model ``state`` dict: what a diverged run's last
    good checkpoint says about its trace (η outside [0, 1] makes the trace grow geometrically)."""
    names = [name for name, module in build_model(config).named_modules()
             if isinstance(module, DHPSoftmax)]
    return [{"eta": float(state[f"{name}.eta"]),
             "max_abs_hebb": float(state[f"{name}.hebb"].abs().max())} for name in names]


def _val_matrix(run_dir: Path):
    # metrics.json keeps test rows only; the validation rows live in the checkpoint's progress.
    return load_checkpoint(run_dir)["metrics"].get("val_acc_matrix") or None


def _averages(matrix) -> list[float]:
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# Fields added to the summary after its first committed records, with the meaning a record
# that lacks them has: it predates the field. Every reader goes through ``migrate_summary``.
SUMMARY_DEFAULTS = {"diverged": None, "dirty": [], "sessions": [], "setting": None}
METRICS_DEFAULTS = {"plasticity": None, "val_acc_matrix": None, "val_avg_acc": None,
                    **dict.fromkeys(TRACE_FIELDS)}


def migrate_summary(record: dict) -> dict:
    r"""A summary of any committed format version, completed to the current one.

    Version-1 records written before ``diverged`` (a finished run then), before ``plasticity``
    (no diagnostics then) and before the trace diagnostics read as if those fields said
    "absent". The variant is recomputed from the config, so old names follow today's naming.
    """
    record = {**SUMMARY_DEFAULTS, **record}
    if record["metrics"] is not None:
        record["metrics"] = {**METRICS_DEFAULTS, **record["metrics"]}
    record["variant"] = (training_variant(record["config"]["training"])
                         + record_suffix(record.get("variant", "")))
    return record


def read_summary(path) -> dict | None:
    r"""The migrated summary at ``path``; None where there is none (missing, unreadable JSON, or
    not a run summary)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("kind") != SUMMARY_KIND:
        return None
    return migrate_summary(record)


def write_summary(path, summary: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, summary)


def load_records(roots) -> list[dict]:
    r"""Summaries found under ``roots``: summary JSON files, and run directories summarised now."""
    records, seen = [], set()
    for root in map(Path, roots):
        for path in sorted(root.rglob("*.json")):
            if path.name in (METRICS_NAME, DIVERGED_NAME):
                if not (path.parent / CONFIG_NAME).exists():
                    continue
                record = summarize_run(path.parent)
            elif path.name in (CONFIG_NAME, "provenance.json"):
                continue
            else:
                record = read_summary(path)
                if record is None:
                    continue
            key = (record["role"], record["benchmark"], record["protocol"], record["variant"],
                   record["seed"], json.dumps(_regularizer(record["config"]), sort_keys=True))
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def load_adaptations(roots) -> list[dict]:
    r"""The adaptation records (benchmarks/adaptation.py) found under ``roots``."""
    found = {}
    for root in map(Path, roots):
        for path in sorted(root.rglob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and record.get("kind") == ADAPTATION_KIND:
                key = (record["benchmark"], record["protocol"], record["variant"], record["seed"])
                found.setdefault(key, record)
    return list(found.values())


def _regularizer(config: dict) -> dict:
    r"""A run's regulariser and its settings, read from ``training`` (old and new configs alike)."""
    training = TrainConfig.from_json(config)
    return {"method": training.method, **training.regularizer_arguments()}
