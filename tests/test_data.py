r"""dhp_deploy.data on the real MNIST files: decoding, verification, bad input, downloads."""
import gzip
import http.server
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from dhp_deploy import data
from dhp_deploy.data import DataError

T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _copy_split(data_dir: Path, root: Path, names=T10K, dataset="MNIST") -> Path:
    raw = root / dataset / "raw"
    raw.mkdir(parents=True)
    for name in names:
        shutil.copy(data_dir / dataset / "raw" / name, raw / name)
    return raw


# --------------------------------------------------------------------------- real files


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DHP_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir("elsewhere") == Path("elsewhere")
    assert data.resolve_data_dir() == tmp_path
    monkeypatch.delenv("DHP_DATA_DIR")
    assert data.resolve_data_dir() == Path("data")


def test_load_split_real_mnist(data_dir):
    x, y = data.load_split(data_dir, "MNIST", train=True)
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert y[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's well-known first labels
    x_test, y_test = data.load_split(data_dir, "MNIST", train=False)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert torch.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                               1009]


def test_load_split_fashion(data_dir):
    if not (data_dir / "FashionMNIST" / "raw" / T10K[0]).exists():
        pytest.skip("no FashionMNIST files")
    x, y = data.load_split(data_dir, "FashionMNIST", train=False)
    assert x.shape == (10000, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_extracted_files_read_and_verified(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in T10K:
        (raw / name[:-3]).write_bytes(gzip.decompress((data_dir / "MNIST/raw" / name).read_bytes()))
    x, y = data.load_split(tmp_path, "MNIST", train=False)
    x_ref, y_ref = data.load_split(data_dir, "MNIST", train=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'KMNIST'.*MNIST, FashionMNIST"):
        data.load_split(tmp_path, "KMNIST")


# --------------------------------------------------------------------------- bad files


def test_missing_file_names_path_and_remedy(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_split(tmp_path, "MNIST", train=False)
    message = str(err.value)
    assert str(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz") in message
    assert "--download" in message and "DHP_DATA_DIR" in message


def test_truncated_gz(data_dir, tmp_path):
    raw = _copy_split(data_dir, tmp_path)
    path = raw / T10K[0]
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError, match=f"{path}: cannot read IDX data"):
        data.read_idx(path)
    with pytest.raises(DataError, match=f"{path}: MD5 .* does not match the expected"):
        data.load_split(tmp_path, "MNIST", train=False)


@pytest.mark.parametrize("cut, expected", [(-784, "fewer bytes"), (+3, "more bytes")])
def test_wrong_length_extracted(data_dir, tmp_path, cut, expected):
    body = gzip.decompress((data_dir / "MNIST/raw" / T10K[0]).read_bytes())
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(body[:cut] if cut < 0 else body + b"\0" * cut)
    with pytest.raises(DataError, match=f"{path}: holds {expected} .* 10000 items"):
        data.read_idx(path)


def test_wrong_checksum_of_valid_idx(data_dir, tmp_path):
    # Recompressed: still a valid IDX gz with the right content, but not torchvision's file.
    raw = _copy_split(data_dir, tmp_path)
    path = raw / T10K[1]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=0))
    assert data.read_idx(path).shape == (10000,)
    expected_md5 = data.MD5["MNIST"][T10K[1]]
    with pytest.raises(DataError, match=f"{path}: MD5 [0-9a-f]{{32}} .*expected {expected_md5}"):
        data.load_split(tmp_path, "MNIST", train=False)


@pytest.mark.parametrize("compress", [False, True])
def test_non_idx_file(tmp_path, compress):
    text = b"<html>404 not found: this is not an IDX file at all</html>\n"
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(text) if compress else text)
    with pytest.raises(DataError, match=f"{path}: not an IDX file .*expected 2051 .* 2049"):
        data.read_idx(path)


def test_tiny_and_wrong_shape_files(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"\0\0\x08")
    with pytest.raises(DataError, match=f"{short}: file ends before the 8-byte IDX header"):
        data.read_idx(short)
    small = tmp_path / "small"
    small.write_bytes(b"".join(v.to_bytes(4, "big") for v in (2051, 1, 10, 10)) + bytes(100))
    with pytest.raises(DataError, match=f"{small}: images are 10x10, expected 28x28"):
        data.read_idx(small)


def test_validate_labels():
    data.validate_labels(torch.tensor([0, 9, 3]), 10, "ok")
    data.validate_labels(torch.zeros(0, dtype=torch.int64), 10, "empty")
    bad = {
        "float": (torch.tensor([0.0, 1.0]), "float32 tensor of shape \\(2,\\), expected a 1-D"),
        "2d": (torch.zeros(2, 2, dtype=torch.int64), "shape \\(2, 2\\), expected a 1-D int64"),
        "high": (torch.tensor([0, 10]), "labels span \\[0, 10\\], expected \\[0, 10\\)"),
        "negative": (torch.tensor([-1, 3]), "labels span \\[-1, 3\\], expected \\[0, 10\\)"),
        "list": ([0, 1], "labels are a list"),
    }
    for name, (labels, message) in bad.items():
        with pytest.raises(DataError, match=f"{name}: .*{message}"):
            data.validate_labels(labels, 10, name)


# --------------------------------------------------------------------------- downloads


class _Handler(http.server.BaseHTTPRequestHandler):
    r"""Serves ``/<mode>/<path under source>``: mode good, corrupt (one byte flipped) or dies
    (announces more bytes than it sends, then closes the connection)."""

    def do_GET(self):
        mode, _, rel = self.path.lstrip("/").partition("/")
        file = self.server.source / rel
        if mode not in ("good", "corrupt", "dies") or not file.is_file():
            self.send_error(404)
            return
        body = bytearray(file.read_bytes())
        if mode == "corrupt":
            body[len(body) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if mode == "dies" else 0)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "dies" else body)
        self.close_connection = mode == "dies"

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(data_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.source = data_dir
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_success(data_dir, tmp_path, mirror):
    url = mirror + "/good/{dataset}/raw/"
    x, y = data.load_split(tmp_path, "MNIST", train=False, download=True, mirrors=[url])
    raw = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(T10K)  # no temporary files left
    for name in T10K:
        assert (raw / name).read_bytes() == (data_dir / "MNIST/raw" / name).read_bytes()
    x_ref, y_ref = data.load_split(data_dir, "MNIST", train=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_download_env_mirror_and_fallback(data_dir, tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("DHP_MNIST_MIRROR", f"{mirror}/nothing-here/,{mirror}/good/{{dataset}}/raw")
    images, labels = data.ensure_files(tmp_path, "MNIST", train=False, download=True)
    assert data.file_md5(images) == data.MD5["MNIST"][T10K[0]]


def test_download_replaces_corrupt_local_file(data_dir, tmp_path, mirror):
    raw = _copy_split(data_dir, tmp_path)
    (raw / T10K[1]).write_bytes(b"garbage")
    data.ensure_files(tmp_path, "MNIST", train=False, download=True,
                      mirrors=[mirror + "/good/{dataset}/raw/"])
    assert (raw / T10K[1]).read_bytes() == (data_dir / "MNIST/raw" / T10K[1]).read_bytes()


@pytest.mark.parametrize("mode, message", [
    ("corrupt", "MD5 [0-9a-f]{32} of the download, expected " + data.MD5["MNIST"][T10K[0]]),
    ("dies", "connection closed after [0-9]+ of [0-9]+ bytes"),
])
def test_failed_download_leaves_no_file(tmp_path, mirror, mode, message):
    with pytest.raises(DataError, match=f"could not download {T10K[0]}(.|\n)*{message}"):
        data.load_split(tmp_path, "MNIST", train=False, download=True,
                        mirrors=[f"{mirror}/{mode}/{{dataset}}/raw/"])
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []  # neither the file nor a temp


def test_make_demo_fetches_the_data_a_fresh_machine_lacks(tmp_path, mirror):
    # The README's main command on a machine without MNIST: its training step downloads the
    # files (here from a local mirror of the real ones), verifies them and trains.
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    empty = tmp_path / "data"
    plan = subprocess.run(["make", "-n", "--no-print-directory", "demo",
                           f"DHP_DATA_DIR={empty}", f"DEMO_RUN={tmp_path / 'run'}"],
                          cwd=repo, capture_output=True, text=True, check=True).stdout
    (train,) = [line for line in plan.replace("\\\n", " ").splitlines()
                if "bin/dhp-train " in line]
    env = {**os.environ, "DHP_DATA_DIR": str(empty),
           "DHP_MNIST_MIRROR": mirror + "/good/{dataset}/raw/"}
    result = subprocess.run(shlex.split(train), cwd=repo, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(path.name for path in (empty / "MNIST" / "raw").iterdir()) == sorted(
        name for name in data.MD5["MNIST"] if name.endswith(".gz"))
    assert (tmp_path / "run" / "metrics.json").exists()
