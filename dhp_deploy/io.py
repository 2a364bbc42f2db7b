r"""Atomic writes: readers of a file or a folder see its old content or its new one, never part.

A file is written to a temporary file beside it (the same file system, so the rename is atomic),
flushed to disk, then renamed over the target (``os.replace``). A folder (an export bundle, a
Triton repository) is built in a temporary folder beside its target, flushed, then renamed into
place; replacing an existing folder moves the old one aside first. When anything fails, the
target is left as it was and the temporary is removed.

A utility below every stage of the package: it imports nothing from ``dhp_deploy`` and no torch,
so serving with onnxruntime writes its files without loading torch.
"""

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

__all__ = ["atomic_writer", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "make_sibling_dir", "fsync_tree", "commit_directory", "non_directory_ancestor"]


def _sibling(target: Path, kind: str) -> Path:
    # Hidden and beside the target: the same file system (renames stay atomic), and a name that
    # says whose temporary it is if a killed process leaves one behind.
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"


def _create_sibling_file(target: Path) -> tuple[Path, int]:
    # Not tempfile.mkstemp: it makes the file 0600, and the target would keep that mode. Mode
    # 0o666 under the umask gives the file the permissions open() would have given it.
    while True:
        tmp = _sibling(target, "tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # a name already taken: draw another
            continue


@contextmanager
def atomic_writer(path) -> Iterator[BinaryIO]:
    r"""A binary file whose content replaces ``path`` when the ``with`` block ends.

    If the block raises (a serialiser that fails, a full disk, a checksum that does not match)
    ``path`` keeps its old content, or stays absent, and the temporary file is removed.
    """
    path = Path(path)
    tmp, fd = _create_sibling_file(path)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_writer(path) as file:
        file.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def make_sibling_dir(target, kind: str = "tmp") -> Path:
    r"""A new empty folder beside ``target`` (hidden, named after it) to build its content in.

    Its permissions are those ``mkdir`` gives (``tempfile.mkdtemp`` would make it private, and
    a folder renamed into place keeps them)."""
    target = Path(target)
    while True:
        folder = _sibling(target, kind)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # a name already taken: draw another
            continue


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    r"""Flush every file and folder under ``root``, and ``root`` itself, to disk."""
    for folder, folders, files in os.walk(root, topdown=False):  # contents before their folder
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


def commit_directory(tmp, target, *, overwrite: bool = False) -> None:
    r"""Make the finished folder ``tmp`` (a sibling of ``target``) the folder ``target``.

    Readers see no ``target``, the old one or the new one, never a mix: ``tmp`` is flushed to
    disk and renamed into place. With ``overwrite`` an existing ``target`` folder is moved aside,
    ``tmp`` renamed in, then the old folder deleted; if the rename in fails the old folder is
    put back.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is false (nothing changed).
        NotADirectoryError: ``target`` is a file or a symbolic link, never replaced.
        OSError: the flush or a rename failed; ``target`` is as it was, ``tmp`` is left to the
            caller.
    """
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    if not os.path.lexists(target):
        # Checked, then renamed: a folder made at ``target`` in between makes the rename fail
        # (unless it is empty: POSIX renames a folder over an empty one).
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    if target.is_symlink() or not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder; not replacing it",
                                 str(target))
    # A folder cannot be renamed over a non-empty one: the old one goes aside first.
    aside = make_sibling_dir(target, "old")
    os.rename(target, aside / target.name)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside / target.name, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def non_directory_ancestor(path) -> Optional[Path]:
    r"""The nearest existing ancestor of ``path`` if it is not a folder, else None.

    Writing at ``path`` would fail there with a bare "Not a directory" or "File exists"; a
    command line checks this first to name the file in the way."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return None if parent.is_dir() else parent
