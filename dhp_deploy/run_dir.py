r"""The run directory: its file names, atomic writes, checkpoints, and reading what a run left.

Loads never unpickle code.

A checkpoint is one ``torch.save`` file of tensors and plain Python values (dicts, lists, str, int,
float, bool, None), loaded with ``weights_only=True``. Layout (format version 2)::

    {"format": "dhp-deploy-checkpoint", "version": 2,
     "config":    the run's JSON configuration (dhp_deploy.config: its layout and migration),
     "benchmark": {"name", "num_classes", "input_size", "scenario", "tasks": [{"task_id", "classes"}]},
     "model":     the network's state_dict (with the Hebbian trace),
     "optimizer", "regularizer", "rng": states needed for an exact resume ("optimizer" is None
                  where the run never built torch's SGD: plain SGD without momentum, no state),
     "position":  {"task": int, "epoch": int, "finished": bool},
     "metrics":   metrics so far (JSON-able),
     "saved_traces": per task done, each DHP head's trace at its end}

Version 1 differs only in its configuration's layout (config version 1): :func:`load_checkpoint`
and :func:`read_config` migrate it, so runs saved by older releases load, resume and export.

A run directory holds ``checkpoint.pt`` (the latest), ``config.json`` and, when finished,
``metrics.json``, ``metrics.csv`` and ``accuracy.png``; these names are defined here only.
"""

import json
from pathlib import Path

import torch

from dhp_deploy.config import build_model, migrate_config
# The atomic writes live in dhp_deploy.io (no torch); they are re-exported here, where the run
# directory's writers have always found them.
from dhp_deploy.io import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_writer
from dhp_deploy.network import DHPNet

__all__ = ["CheckpointError", "CHECKPOINT_NAME", "CONFIG_NAME", "METRICS_NAME",
           "METRICS_CSV_NAME", "PLOT_NAME", "RUN_FILES", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "save_checkpoint", "load_checkpoint", "is_finished", "read_config",
           "read_metrics", "load_model"]

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME, METRICS_CSV_NAME, PLOT_NAME = "metrics.json", "metrics.csv", "accuracy.png"
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, METRICS_CSV_NAME, PLOT_NAME)
FORMAT = "dhp-deploy-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the configuration's first layout (migrated on load)


class CheckpointError(Exception):
    r"""A checkpoint or run directory that cannot be used; the message names the file and why."""


def save_checkpoint(path, payload: dict) -> None:
    r"""Write ``payload`` (the layout above, without format/version) atomically to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_writer(path) as file:
        torch.save(payload, file)


def load_checkpoint(path, map_location="cpu") -> dict:
    r"""Load a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dhp-deploy checkpoint")
    if payload.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format version {payload.get('version')}, "
                              f"this dhp-deploy reads versions {READABLE_VERSIONS[0]} to {VERSION}")
    try:
        payload["config"] = migrate_config(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds no readable run configuration ({err})") from None
    return {**payload, "version": VERSION}


def is_finished(run_dir) -> bool:
    r"""Whether the run in ``run_dir`` has finished (its metrics are written last)."""
    return (Path(run_dir) / METRICS_NAME).is_file()


def read_config(run_dir) -> dict:
    r"""The run's ``config.json`` in the current layout (:func:`~dhp_deploy.config.migrate_config`);
    :class:`CheckpointError` for one this release cannot read."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        return migrate_config(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as err:  # json's errors are ValueErrors
        raise CheckpointError(f"{path} is not a readable run configuration ({err})") from None


def read_metrics(run_dir) -> dict:
    r"""The finished run's ``metrics.json``."""
    return json.loads((Path(run_dir) / METRICS_NAME).read_text())


def load_model(run_dir) -> tuple[DHPNet, dict]:
    r"""The trained network of a run (eval mode, latest trace) and its checkpoint payload."""
    payload = load_checkpoint(run_dir)
    model = build_model(payload["config"])
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{run_dir}: weights do not fit the saved model config "
                              f"({str(err).splitlines()[0]})") from None
    return model.eval(), payload
