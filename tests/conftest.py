r"""Shared pytest fixtures. Keep this small: fixtures used by more than one test file only."""
import os
from pathlib import Path

import pytest

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
