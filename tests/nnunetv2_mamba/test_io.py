"""nnunetv2_mamba.io: atomic file writes and staged folders never leave half-written output."""
import os
import stat

import pytest

from nnunetv2_mamba import io as staged_io


class Interrupted(Exception):
    """Stands for any failure (a crash, a full disk) in the middle of writing."""


def hidden_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    staged_io.atomic_write(target, "first")
    staged_io.atomic_write(target, b"second \xe2\x9c\x93")
    assert target.read_text(encoding="utf-8") == "second \u2713"
    assert hidden_leftovers(tmp_path) == []
    # The file gets the user's umask like any new file (not the 0600 of tempfile.mkstemp).
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "plans.json"
    target.write_text("old content")
    real_fsync = os.fsync

    def failing_fsync(descriptor):
        # The new bytes were written to the temporary file but the write does not complete.
        raise Interrupted("disk full")

    monkeypatch.setattr(staged_io.os, "fsync", failing_fsync)
    with pytest.raises(Interrupted):
        staged_io.atomic_write(target, "new content that must never be seen half-written")
    monkeypatch.setattr(staged_io.os, "fsync", real_fsync)
    assert target.read_text() == "old content"
    assert hidden_leftovers(tmp_path) == []


def test_atomic_write_refuses_other_data_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "per_class.csv"
    staged_io.atomic_write(target, "old\n")
    with pytest.raises(TypeError, match=r"per_class.csv\) takes str or bytes, not int"):
        staged_io.atomic_write(target, 12345)  # bytes(12345) would be 12345 zero bytes
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["per_class.csv"]


def test_atomic_write_mode_is_set_before_the_file_appears(tmp_path, monkeypatch):
    target = tmp_path / "train.sh"
    umask = os.umask(0)
    os.umask(umask)
    seen = []
    real_replace = os.replace

    def replace(source, destination):
        seen.append(stat.S_IMODE(os.stat(source).st_mode))
        real_replace(source, destination)

    monkeypatch.setattr(staged_io.os, "replace", replace)
    staged_io.atomic_write(target, "#!/bin/bash\n", mode=0o777)
    assert seen == [0o777 & ~umask] and stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    staged_io.atomic_write(target, "#!/bin/bash\necho\n")  # a rewrite gets the default mode again
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_staged_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out" / "Dataset001_X"
    with staged_io.staged_directory(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".")
        assert not target.exists()  # nothing visible under the final name while writing
        (staging / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    assert hidden_leftovers(target.parent) == []


def test_staged_directory_failure_leaves_nothing_new(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(Interrupted):
        with staged_io.staged_directory(target) as staging:
            (staging / "half.png").write_bytes(b"\x89PNG")
            raise Interrupted("crash while writing")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_staged_directory_failure_keeps_the_existing_folder(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.png").write_text("old")
    with pytest.raises(Interrupted):
        with staged_io.staged_directory(target, replace=True) as staging:
            (staging / "new.png").write_text("new")
            raise Interrupted("crash while writing")
    assert sorted(p.name for p in target.iterdir()) == ["old.png"]
    assert hidden_leftovers(tmp_path) == []


def test_staged_directory_replace_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.png").write_text("old")
    with staged_io.staged_directory(target, replace=True) as staging:
        (staging / "new.png").write_text("new")
        assert (target / "old.png").exists()  # the old export stays readable until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.png"]
    assert hidden_leftovers(tmp_path) == []


def test_staged_directory_refuses_an_existing_target_unless_replacing(tmp_path):
    target = tmp_path / "Dataset001_X"
    target.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        with staged_io.staged_directory(target):
            pytest.fail("the block must not run")
    assert list(tmp_path.iterdir()) == [target]


def test_staged_directory_failed_rename_restores_the_existing_folder(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.png").write_text("old")
    real_rename = type(target).rename

    def rename(self, destination):
        if self.name.startswith(".export.staging"):
            raise Interrupted("rename failed")
        return real_rename(self, destination)

    monkeypatch.setattr(type(target), "rename", rename)
    with pytest.raises(Interrupted):
        with staged_io.staged_directory(target, replace=True) as staging:
            (staging / "new.png").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["old.png"]
    assert hidden_leftovers(tmp_path) == []
