"""Run directories as older releases wrote them: checkpoint format 1, configuration layout 1."""

import json
from pathlib import Path

import torch


def as_version_1(run_dir, unknown=()) -> None:
    r"""Rewrite ``run_dir``'s ``config.json`` and checkpoint in the version-1 layout (a ``model``
    section restating four training fields, no ``config_version``, checkpoint version 1), as a
    release that did not know the options ``unknown`` wrote them."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    old = _config_version_1(config, unknown)
    (run_dir / "config.json").write_text(json.dumps(old))
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # raw: not migrated
    payload.update(version=1, config=_config_version_1(payload["config"], unknown))
    torch.save(payload, run_dir / "checkpoint.pt")


def _config_version_1(config: dict, unknown) -> dict:
    training = {key: value for key, value in config["training"].items() if key not in unknown}
    model = {**config["data_shape"],
             **{key: config["training"][key] for key in ("hidden", "dhp", "eta_init", "head_init")
                if key not in unknown}}
    rest = {key: value for key, value in config.items()
            if key not in ("config_version", "training", "data_shape")}
    return {"training": training, "model": model, **rest}
