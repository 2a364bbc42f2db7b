r"""Shared pytest fixtures. Keep this small: fixtures used by more than one test file only."""
import os
from pathlib import Path

import pytest

from cli_helpers import run_cli

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    r"""The MNIST data root: ``$DHP_DATA_DIR``, else ``<repo>/../shared/data``; skips if absent."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("DHP_DATA_DIR") or default)
    raw = root / "MNIST" / "raw"
    missing = [n for n in _MNIST_FILES if not (raw / f"{n}.gz").exists() and not (raw / n).exists()]
    if missing:
        pytest.skip(f"MNIST files not found under {raw} (set DHP_DATA_DIR): missing {missing}")
    return root


@pytest.fixture(scope="session")
def _synthetic_root(tmp_path_factory) -> tuple[Path, dict]:
    from synthetic import write_idx_root

    root = tmp_path_factory.mktemp("synthetic-mnist")
    return root, write_idx_root(root)


@pytest.fixture
def synthetic_mnist(_synthetic_root, monkeypatch) -> Path:
    r"""A data root of small synthetic MNIST-format files (12000 train, 2000 test images) whose
    checksums this test's ``dhp_deploy.data.MD5`` accepts: the data path, the task builders and
    everything in-process above them run on it without the real files (the fast lane)."""
    from dhp_deploy import data

    root, checksums = _synthetic_root
    monkeypatch.setitem(data.MD5, "MNIST", {**data.MD5["MNIST"], **checksums})
    return root


# Small but real: 1 epoch per task on 2000 training images, the full MNIST test set (10000).
SERVED_TRAINING = ["--benchmark", "split-mnist", "--method", "finetune", "--dhp", "--epochs", "1",
                   "--train-limit", "2000", "--hidden", "64,64", "--lr", "0.05", "--seed", "0"]


@pytest.fixture(scope="session")
def served(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    r"""(run_dir, bundle_dir) of one real ``dhp-train`` run exported by ``dhp-export``."""
    root = tmp_path_factory.mktemp("served")
    for command, args in (("train", [*SERVED_TRAINING, "--out", root / "run"]),
                          ("export", [root / "run", "--format", "all", "--out", root / "bundle"])):
        result = run_cli(command, *args, "--data-dir", data_dir)
        assert result.returncode == 0, f"dhp-{command} failed:\n{result.stderr}"
    return root / "run", root / "bundle"


def pytest_collection_modifyitems(items):
    r"""Mark every test that reads the real MNIST files (through ``data_dir``, directly or via a
    fixture such as ``served``) ``mnist``: ``pytest -m "not mnist"`` is the fast lane."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mnist)
