"""nnunetv2_mamba.reliability: atomic writes, checkpoint messages, versions, the out-of-memory message."""
import os

import pytest
import torch

from nnunetv2_mamba import reliability
from nnunetv2_mamba.reliability import (CHECKPOINT_KEY, CheckpointError, NonFiniteLossCounter, NonFiniteLossError,
                                        atomic_save, atomic_torch_save, check_checkpoint_version,
                                        out_of_memory_message, require_checkpoint)


def test_atomic_write_replaces_in_one_step_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "file.pth"
    atomic_torch_save({"a": 1}, str(target))
    assert torch.load(target) == {"a": 1}

    def fails(path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt  # also an interrupt (Ctrl-C) leaves the old file
    with pytest.raises(KeyboardInterrupt):
        atomic_save(fails, str(target))
    assert torch.load(target) == {"a": 1} and os.listdir(tmp_path) == ["file.pth"]
    assert atomic_save(lambda path: None, str(tmp_path / "never.pth")) is False
    assert os.listdir(tmp_path) == ["file.pth"]


def test_atomic_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(reliability.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(reliability.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_torch_save([1, 2], str(tmp_path / "x.pth"))
    assert events[:2] == ["fsync", "replace"]


def test_prediction_without_checkpoint_final_names_what_exists(tmp_path):
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "checkpoint_latest.pth").touch()
    (tmp_path / "fold_0" / "checkpoint_best.pth").touch()
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "checkpoint_final.pth").touch()
    require_checkpoint(str(tmp_path), [1])
    with pytest.raises(CheckpointError) as error:
        require_checkpoint(str(tmp_path), [1, 0])
    message = str(error.value)
    assert message.startswith("Cannot predict with fold 0: checkpoint_final.pth is missing.")
    assert "holds checkpoint_best.pth, checkpoint_latest.pth; other folds: fold_1: checkpoint_final.pth" in message
    assert "nnUNetv2_train ... --c" in message and "-chk checkpoint_best.pth" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="fold_3 does not exist.*train this fold first"):
        require_checkpoint(str(tmp_path), [3])


@pytest.mark.parametrize("stored,expected", [("0.0.9", "an older version"), ("7.2.0", "a newer version")])
def test_version_messages(stored, expected):
    assert check_checkpoint_version({CHECKPOINT_KEY: {"version": reliability.__version__}}) is None
    message = check_checkpoint_version({CHECKPOINT_KEY: {"version": stored}}, "x.pth")
    assert message.startswith(f"x.pth was written by nnunetv2-mamba {stored}, {expected}")
    assert f"nnunetv2-mamba=={stored}" in message


def test_out_of_memory_message_without_allocation_size():
    message = out_of_memory_message("Vivim", (5, 256, 256), 4, RuntimeError("CUDA out of memory."),
                                    torch.device("cpu"), "prediction")
    assert message.startswith("Out of GPU memory in the prediction step of Vivim (patch size [5, 256, 256], batch "
                              "size 4): the allocation size is unknown.")


def test_counter_counts_runs():
    counter = NonFiniteLossCounter(2)
    counter.record(0, 5)
    counter.reset_run()
    counter.record(1, 0)
    with pytest.raises(NonFiniteLossError, match="2 consecutive .* from epoch 1 iteration 0 to epoch 1 iteration 1 "
                                                 r"\(3 skipped steps"):
        counter.record(1, 1)
