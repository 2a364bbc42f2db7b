r"""MNIST-family files on disk → uint8 image and int64 label tensors.

One job: find, verify (MD5), optionally download, and decode the IDX files in torchvision's
on-disk layout, so an existing torchvision data root works unchanged::

    ROOT/MNIST/raw/train-images-idx3-ubyte.gz        (or the same name without .gz)
    ROOT/FashionMNIST/raw/t10k-labels-idx1-ubyte.gz

torchvision itself is not imported: its wheel cannot load beside the CPU torch wheel
(docs/DESIGN.md §2). Every file is checked against torchvision's published MD5 of the ``.gz`` (or,
for an already-extracted file, the MD5 of its decompressed bytes) before it is decoded.

The root is chosen by :func:`resolve_data_dir`: an explicit argument, else ``$DHP_DATA_DIR``,
else ``./data``. Downloads go to the torchvision mirrors; ``$DHP_MNIST_MIRROR`` (comma-separated
base URLs, ``{dataset}`` is replaced by ``MNIST``/``FashionMNIST``) or ``mirrors=`` overrides them.
"""
from __future__ import annotations

import functools
import gzip
import http.client
import hashlib
import io
import os
import pathlib
import urllib.request
import zlib
from collections.abc import Sequence

import torch

from dhp_deploy.io import atomic_writer

DATASETS = ("MNIST", "FashionMNIST")
IMAGE_SIZE = 28

# torchvision's MD5 of each .gz (torchvision/datasets/mnist.py), then of the extracted bytes
# (computed from the verified .gz files) so an extracted root is verified too.
MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

# torchvision's mirror order.
MIRRORS = {
    "MNIST": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "FashionMNIST": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

_MAGIC_IMAGES = 2051  # 0x00000803: unsigned byte, 3 dimensions
_MAGIC_LABELS = 2049  # 0x00000801: unsigned byte, 1 dimension
_CHUNK = 1 << 20


class DataError(Exception):
    r"""A data file or value is missing, corrupt or out of range; the message names it."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    r"""The data root: ``data_dir`` if given, else ``$DHP_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return pathlib.Path(data_dir)
    return pathlib.Path(os.environ.get("DHP_DATA_DIR") or "data")


# --------------------------------------------------------------------------- decoding


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    r"""Decode one IDX file (gzip-compressed or not; detected by content, not by name).

    Returns:
        images (magic 2051) as uint8 ``[N, 28, 28]``, labels (magic 2049) as int64 ``[N]``.

    Raises:
        DataError: the file is not IDX, not 28×28 images, or holds more or fewer bytes than its
        header's count says (truncated).
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if compressed else raw
            return _decode_idx(stream, path)
    except (OSError, EOFError, zlib.error) as err:
        # A cut .gz ends in EOFError, a damaged one in BadGzipFile (an OSError) or zlib.error.
        raise DataError(f"{path}: cannot read IDX data ({type(err).__name__}: {err})") from err


def _decode_idx(stream: io.RawIOBase, path: pathlib.Path) -> torch.Tensor:
    header = _read_exact(stream, 8, path, "the 8-byte IDX header")
    magic, count = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")
    if magic == _MAGIC_LABELS:
        shape = (count,)
    elif magic == _MAGIC_IMAGES:
        dims = _read_exact(stream, 8, path, "the image dimensions")
        rows, cols = int.from_bytes(dims[:4], "big"), int.from_bytes(dims[4:], "big")
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        shape = (count, rows, cols)
    else:
        raise DataError(
            f"{path}: not an IDX file (magic {magic:#010x}, expected {_MAGIC_IMAGES} for "
            f"images or {_MAGIC_LABELS} for labels)"
        )
    # Read straight into the tensor's memory: one copy out of zlib, no per-sample Python.
    out = torch.empty(shape, dtype=torch.uint8)
    got = _readinto_full(stream, memoryview(out.numpy()).cast("B"))
    if got != out.numel() or stream.read(1):
        size = "fewer" if got != out.numel() else "more"
        raise DataError(
            f"{path}: holds {size} bytes than its header's {count} items need "
            f"({out.numel()} data bytes expected): truncated or not this IDX file"
        )
    return out.long() if magic == _MAGIC_LABELS else out


def _read_exact(stream, size: int, path: pathlib.Path, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise DataError(f"{path}: file ends before {what} (not an IDX file or truncated)")
    return data


def _readinto_full(stream, view: memoryview) -> int:
    # readinto may return short reads (gzip hands out one buffer at a time).
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


# --------------------------------------------------------------------------- files and MD5


def split_filenames(train: bool) -> tuple[str, str]:
    r"""The (images, labels) file names of a split, without ``.gz``."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def file_md5(path: str | os.PathLike) -> str:
    r"""Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}, expected one of {', '.join(DATASETS)}")


def _verify_md5(path: pathlib.Path, expected: str) -> None:
    actual = _cached_md5(_file_key(path))
    if actual != expected:
        raise DataError(
            f"{path}: MD5 {actual} does not match the expected {expected} (corrupt or partial "
            f"file: delete it and re-run with --download)"
        )


def _mirrors_for(dataset: str, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is None:
        env = os.environ.get("DHP_MNIST_MIRROR")
        mirrors = [m for m in env.split(",") if m.strip()] if env else MIRRORS[dataset]
    return [m.strip().replace("{dataset}", dataset).rstrip("/") + "/" for m in mirrors]


def download_file(
    filename: str, dest_dir: str | os.PathLike, md5: str, mirrors: Sequence[str]
) -> pathlib.Path:
    r"""Fetch ``filename`` from the first mirror that serves it with the right MD5.

    The bytes go to a temporary file in ``dest_dir`` that is renamed over the destination only
    once complete and verified (``os.replace``), so an interrupted or corrupt download never
    leaves a file behind, partial or temporary.

    Raises:
        DataError: no mirror gave a complete file with the expected MD5 (each failure listed).
    """
    dest_dir = pathlib.Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            return _download_verified(url, dest_dir / filename, md5)
        except (OSError, http.client.HTTPException, ValueError, DataError) as err:
            # URLError is an OSError; ValueError is a malformed mirror URL. Try the next mirror.
            failures.append(f"{url}: {type(err).__name__}: {err}")
    raise DataError(
        f"could not download {filename} into {dest_dir} with MD5 {md5}; tried: "
        + "; ".join(failures or ["(no mirrors given)"])
    )


def _download_verified(url: str, dest: pathlib.Path, md5: str) -> pathlib.Path:
    # The checks raise inside the atomic writer: a short or corrupt download never replaces
    # dest, and its temporary file is removed.
    digest, got = hashlib.md5(), 0
    with atomic_writer(dest) as out, urllib.request.urlopen(url, timeout=60) as response:
        expected_len = response.headers.get("Content-Length")
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            out.write(chunk)
            digest.update(chunk)
            got += len(chunk)
        # http.client returns a short body silently when the server closes early.
        if expected_len is not None and got != int(expected_len):
            raise DataError(f"connection closed after {got} of {expected_len} bytes")
        if digest.hexdigest() != md5:
            raise DataError(f"MD5 {digest.hexdigest()} of the download, expected {md5}")
    return dest


def ensure_files(
    root: str | os.PathLike,
    dataset: str = "MNIST",
    train: bool = True,
    download: bool = False,
    *,
    mirrors: Sequence[str] | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    r"""Paths of a split's (images, labels) files, each MD5-verified; downloads if asked.

    A ``.gz`` is preferred over an extracted file of the same name. With ``download=True`` a
    missing or corrupt ``.gz`` is (re)fetched; without it, a missing file is a :class:`DataError`.
    """
    _check_dataset(dataset)
    raw_dir = pathlib.Path(root) / dataset / "raw"
    paths = []
    for name in split_filenames(train):
        gz, plain = raw_dir / f"{name}.gz", raw_dir / name
        path = gz if gz.exists() or not plain.exists() else plain
        if download and (not path.exists() or file_md5(path) != MD5[dataset][path.name]):
            path = download_file(gz.name, raw_dir, MD5[dataset][gz.name],
                                 _mirrors_for(dataset, mirrors))
        if not path.exists():
            raise DataError(
                f"missing {gz} (or its extracted {plain.name}): fetch it with dhp-train --download, "
                f"or point --data-dir / DHP_DATA_DIR at a root holding {dataset}/raw/"
            )
        _verify_md5(path, MD5[dataset][path.name])
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------- splits


def validate_labels(y: torch.Tensor, num_classes: int, name: str) -> None:
    r"""Reject labels that are not int64 1-D in ``[0, num_classes)``.

    The data boundary: labels are checked once, here on the CPU, because an out-of-range label
    reaching a CUDA ``index_add_`` is a device-side assert that kills the process.
    """
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) \
            else type(y).__name__
        raise DataError(f"{name}: labels are a {desc}, expected a 1-D int64 tensor")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{name}: labels span [{int(y.min())}, {int(y.max())}], expected [0, {num_classes})"
        )


def load_split(
    root: str | os.PathLike | None,
    dataset: str = "MNIST",
    train: bool = True,
    download: bool = False,
    *,
    mirrors: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Images uint8 ``[N, 28, 28]`` and labels int64 ``[N]`` of one split, verified.

    ``root`` goes through :func:`resolve_data_dir` (None → ``$DHP_DATA_DIR`` → ``./data``).
    Decoded tensors are cached in-process per file version, so the returned tensors are shared:
    treat them as read-only (index or copy them; never modify in place).
    """
    images_path, labels_path = ensure_files(
        resolve_data_dir(root), dataset, train, download, mirrors=mirrors
    )
    return _decode_split(_file_key(images_path), _file_key(labels_path))


def _file_key(path: pathlib.Path) -> tuple[str, int, int]:
    # Path plus mtime and size: a replaced file is decoded afresh, not served from the cache.
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=64)
def _cached_md5(key: tuple[str, int, int]) -> str:
    # Hashing the 10-26 MB image files costs more than a warm build; hash each version once.
    return file_md5(key[0])


@functools.lru_cache(maxsize=4)
def _decode_split(images_key: tuple, labels_key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_key[0]), read_idx(labels_key[0])
    if images.dim() != 3 or labels.dim() != 1:
        raise DataError(f"{images_key[0]} / {labels_key[0]}: expected an images and a labels file")
    if len(images) != len(labels):
        raise DataError(
            f"{images_key[0]} holds {len(images)} images but {labels_key[0]} "
            f"{len(labels)} labels, expected equal counts"
        )
    validate_labels(labels, 10, labels_key[0])
    return images, labels


def clear_cache() -> None:
    r"""Forget decoded splits and file hashes (for cold-start timing, or to free memory)."""
    _decode_split.cache_clear()
    _cached_md5.cache_clear()
