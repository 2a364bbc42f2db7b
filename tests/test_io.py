"""dhp_deploy.io: atomic file and folder writes leave the old content whole when they fail, and
no temporary behind; the module loads no torch."""

import errno
import json
import os
import subprocess
import sys

import pytest

from dhp_deploy.io import (atomic_write_bytes, atomic_write_json, atomic_write_text,
                           atomic_writer, commit_directory, make_sibling_dir,
                           non_directory_ancestor)

OLD = b"the old content, whole\n"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def names(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def old_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(OLD)
    return path


# ----------------------------------------------------------------------------- files


def test_bytes_text_and_json_replace_the_file_with_open_s_permissions(old_file):
    atomic_write_bytes(old_file, b"\x00\x01")
    assert old_file.read_bytes() == b"\x00\x01"
    atomic_write_text(old_file, "Hebb ⊙ α\n")
    assert old_file.read_text(encoding="utf-8") == "Hebb ⊙ α\n"
    atomic_write_json(old_file, {"acc": 0.97, "tasks": [1, 2]})
    assert json.loads(old_file.read_text()) == {"acc": 0.97, "tasks": [1, 2]}
    assert old_file.read_text().endswith("}\n")
    # The mode open() would give (mkstemp's 0600 would have made a shared data root unreadable).
    assert old_file.stat().st_mode & 0o777 == 0o666 & ~umask()
    assert names(old_file.parent) == [old_file.name]


def test_a_new_file_is_created(tmp_path):
    atomic_write_bytes(tmp_path / "new.bin", b"abc")
    assert (tmp_path / "new.bin").read_bytes() == b"abc" and names(tmp_path) == ["new.bin"]


def test_a_serialiser_that_raises_leaves_the_old_file(old_file):
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(old_file, {"fine": 1, "broken": object()})
    assert old_file.read_bytes() == OLD and names(old_file.parent) == [old_file.name]


def test_a_write_that_fails_midway_leaves_the_old_file(old_file):
    with pytest.raises(RuntimeError, match="serialiser died"):
        with atomic_writer(old_file) as file:
            file.write(b"half of the new con")  # already on its way to the temporary file
            raise RuntimeError("serialiser died")
    assert old_file.read_bytes() == OLD and names(old_file.parent) == [old_file.name]


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_a_full_disk_leaves_the_old_file_or_none(old_file, tmp_path, monkeypatch, step):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh = tmp_path / "fresh.json"
    if step == "write":  # the disk fills while the bytes go out
        class FullFile:
            def __init__(self, file):
                self.file = file

            def write(self, data):
                self.file.write(data[:3])
                full()

        for path in (old_file, fresh):
            with pytest.raises(OSError, match="No space"):
                with atomic_writer(path) as file:
                    FullFile(file).write(b"new content")
    else:  # the flush to disk, or the rename, fails
        monkeypatch.setattr(os, step, full)
        for path in (old_file, fresh):
            with pytest.raises(OSError, match="No space"):
                atomic_write_bytes(path, b"new content")
    assert old_file.read_bytes() == OLD and not fresh.exists()
    assert names(tmp_path) == [old_file.name]


def test_a_checkpoint_whose_pickling_fails_leaves_the_old_one(tmp_path):
    from dhp_deploy.run_dir import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    config = {"config_version": 2, "training": {}}
    save_checkpoint(path, {"config": config, "position": {"task": 1}})
    before = path.read_bytes()
    with pytest.raises(Exception):  # pickle's error type for a lambda varies by version
        save_checkpoint(path, {"config": config, "position": {"task": 2}, "hook": lambda: None})
    assert path.read_bytes() == before and load_checkpoint(path)["position"] == {"task": 1}
    assert names(tmp_path) == ["checkpoint.pt"]


def test_run_dir_re_exports_the_writes():
    import dhp_deploy.run_dir as run_dir

    assert (run_dir.atomic_write_bytes, run_dir.atomic_write_text, run_dir.atomic_write_json) \
        == (atomic_write_bytes, atomic_write_text, atomic_write_json)


# ----------------------------------------------------------------------------- folders


def build(tmp_path, target, content: str):
    folder = make_sibling_dir(target)
    (folder / "nested").mkdir()
    (folder / "nested" / "file.txt").write_text(content)
    return folder


def test_a_sibling_folder_is_hidden_beside_its_target_with_mkdir_s_permissions(tmp_path):
    first, second = make_sibling_dir(tmp_path / "b"), make_sibling_dir(tmp_path / "b")
    assert first != second and first.parent == tmp_path and first.name.startswith(".b.tmp-")
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_commit_renames_a_folder_into_place(tmp_path):
    target = tmp_path / "bundle"
    commit_directory(build(tmp_path, target, "new"), target)
    assert (target / "nested" / "file.txt").read_text() == "new"
    assert names(tmp_path) == ["bundle"]


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "bundle"
    commit_directory(build(tmp_path, target, "old"), target)
    tmp = build(tmp_path, target, "new")
    with pytest.raises(FileExistsError):
        commit_directory(tmp, target)
    assert (target / "nested" / "file.txt").read_text() == "old"
    assert names(tmp_path) == sorted(["bundle", tmp.name])  # the temporary is the caller's
    commit_directory(tmp, target, overwrite=True)
    assert (target / "nested" / "file.txt").read_text() == "new"
    assert names(tmp_path) == ["bundle"], "the old folder was deleted, nothing left aside"


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_or_a_link_in_the_way_is_never_replaced(tmp_path, kind):
    target = tmp_path / "bundle"
    if kind == "file":
        target.write_text("not a bundle")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    tmp = build(tmp_path, target, "new")
    with pytest.raises(NotADirectoryError):
        commit_directory(tmp, target, overwrite=True)
    assert target.is_symlink() if kind == "symlink" else target.read_text() == "not a bundle"


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    commit_directory(build(tmp_path, target, "old"), target)
    tmp = build(tmp_path, target, "new")
    rename = os.rename

    def failing(src, dst):
        if str(src) == str(tmp):  # moving the old one aside works; renaming the new one in not
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="Input/output"):
        commit_directory(tmp, target, overwrite=True)
    assert (target / "nested" / "file.txt").read_text() == "old"
    assert names(tmp_path) == sorted(["bundle", tmp.name]), "no old folder left aside"


def test_non_directory_ancestor_names_the_file_in_the_way(tmp_path):
    assert non_directory_ancestor(tmp_path / "a" / "b" / "out.npy") is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert non_directory_ancestor(blocker / "b" / "out.npy") == blocker
    assert non_directory_ancestor(blocker / "out.npy") == blocker


def test_io_loads_no_torch_and_nothing_else_of_the_package():
    script = ("import sys, dhp_deploy.io\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dhp_deploy')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['dhp_deploy', 'dhp_deploy.io']"
