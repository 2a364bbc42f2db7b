r"""The built wheel installed as a user would, without extras: training ends cleanly without the
plotting extra, and export names the extra it needs in one line.

The fresh venv sees this venv's torch (and the other core dependencies) through a ``.pth`` file
of symlinks instead of a second 700 MB install; matplotlib, onnx and onnxruntime are not linked,
so they are absent there as they are for a user who ran ``pip install dhp-deploy``.
"""

import importlib.metadata
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
CORE = ("torch", "numpy", "click")  # pyproject's dependencies: what a plain install brings
TINY = ["--benchmark", "split-mnist", "--epochs", "1", "--num-tasks", "2", "--train-limit", "200",
        "--test-limit", "100", "--hidden", "16"]


def _with_requirements(names) -> set:
    r"""The distributions ``names`` need, recursively (extras' requirements left out)."""
    todo, seen = list(names), set()
    while todo:
        name = re.split(r"[<>=!~ ;\[]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(requirement)
    return seen


def _link_core(base: Path) -> None:
    r"""Symlink the core distributions' files (top-level packages and dist-info) into ``base``."""
    base.mkdir()
    for name in _with_requirements(CORE):
        dist = importlib.metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (site / top).exists() and not (base / top).exists():
                (base / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(REPO)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("dhp_deploy-*.whl"))
    venv.EnvBuilder(with_pip=True).create(tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The venv's own old setuptools would shadow the linked one torch requires.
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                   capture_output=True, check=False)
    _link_core(tmp / "core")
    (Path(site) / "core.pth").write_text(f"{tmp / 'core'}\n")
    # --no-index: every requirement must already be met by the linked core.
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    absent = subprocess.run([python, "-c", "import matplotlib"], capture_output=True)
    assert absent.returncode != 0, "matplotlib leaked into the plain install"
    return tmp


def test_training_without_the_plot_extra_ends_cleanly(plain_install, data_dir):
    run = plain_install / "run"
    result = subprocess.run([plain_install / "venv" / "bin" / "dhp-train", *TINY, "--out", run,
                             "--data-dir", data_dir], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "dhp-deploy[train]" in line] != []
    assert (run / "metrics.json").exists() and (run / "metrics.csv").exists()
    assert not (run / "accuracy.png").exists()


def test_export_without_the_onnx_extra_names_it(plain_install, data_dir):
    run = plain_install / "run"
    if not (run / "metrics.json").exists():
        pytest.skip("needs the training test's run")
    result = subprocess.run([plain_install / "venv" / "bin" / "dhp-export", run, "--format",
                             "onnx", "--out", plain_install / "bundle"],
                            capture_output=True, text=True, timeout=600)
    assert_one_line_error(result, "dhp-deploy[onnx]")
    assert not (plain_install / "bundle").exists()
