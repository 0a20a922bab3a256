"""The trainers' reliability layer (trainers/base.py): atomic checkpoints with nnU-Net's content, clear load
errors, the plugin version, skipped non-finite steps, the out-of-memory message, deterministic CPU steps."""
import glob
import io
import os

import numpy as np
import pytest
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba import reliability
from nnunetv2_mamba.reliability import (CHECKPOINT_KEY, CheckpointError, MambaOutOfMemoryError,
                                        NonFiniteLossError)
from nnunetv2_mamba.ssm.scan import backend_names
from nnunetv2_mamba.trainers.logvmamba import nnUNetTrainerLoGVMambaPaperRecipe
from nnunetv2_mamba.trainers.umamba import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP
from nnunetv2_mamba.version import __version__
from tests.test_umamba_trainers import make_batch, make_trainer


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    return make_trainer(nnUNetTrainerUMambaBot, "3d_fullres", tmp_path, monkeypatch)


def _log(trainer) -> str:
    return open(trainer.log_file).read()


def _train(trainer, steps=1, seed=0):
    trainer.network.train()
    for step in range(steps):
        trainer.train_step(make_batch(trainer, seed=seed + step))


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------

def test_checkpoint_content_is_nnunets_plus_the_plugin_version(trainer, tmp_path):
    _train(trainer)
    trainer.current_epoch = 3
    ours, theirs = tmp_path / "ours.pth", tmp_path / "theirs.pth"
    trainer.save_checkpoint(str(ours))
    nnUNetTrainer.save_checkpoint(trainer, str(theirs))
    ours = torch.load(ours, weights_only=False)
    theirs = torch.load(theirs, weights_only=False)
    assert set(ours) == set(theirs) | {CHECKPOINT_KEY}
    assert ours[CHECKPOINT_KEY] == {"version": __version__}
    _assert_same_state(ours["network_weights"], theirs["network_weights"])
    assert str(ours["optimizer_state"]) == str(theirs["optimizer_state"])
    for key in set(theirs) - {"network_weights", "optimizer_state"}:
        assert ours[key] == theirs[key], key
    assert ours["current_epoch"] == 4 and ours["trainer_name"] == "nnUNetTrainerUMambaBot"


def _half_writing_save(real_save):
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        with open(f, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("simulated crash during the write")
    return save


def test_crash_during_checkpoint_write_keeps_the_previous_checkpoint(trainer, monkeypatch):
    filename = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.current_epoch = 0
    trainer.save_checkpoint(filename)
    saved_weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    _train(trainer)
    trainer.current_epoch = 1
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _half_writing_save(torch.save))
        with pytest.raises(OSError, match="simulated crash"):
            trainer.save_checkpoint(filename)
    checkpoint = torch.load(filename, weights_only=False)
    assert checkpoint["current_epoch"] == 1
    _assert_same_state(checkpoint["network_weights"], saved_weights)
    assert sorted(os.listdir(trainer.output_folder)) == sorted(
        ["checkpoint_latest.pth", os.path.basename(trainer.log_file)]), "no temporary file may be left"
    # nnU-Net's own save under the same crash destroys the previous file (the reason for the override).
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _half_writing_save(torch.save))
        with pytest.raises(OSError):
            nnUNetTrainer.save_checkpoint(trainer, filename)
    with pytest.raises(Exception):
        torch.load(filename, weights_only=False)


def test_load_checkpoint_restores_epoch_optimizer_and_grad_scaler(trainer, tmp_path, monkeypatch):
    _train(trainer, steps=2)
    trainer.current_epoch = 6
    # A GradScaler as on CUDA, with a non-default state, must come back too.
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    filename = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(filename)
    torch.manual_seed(1)
    fresh = make_trainer(nnUNetTrainerUMambaBot, "3d_fullres", tmp_path, monkeypatch)
    fresh.grad_scaler = torch.amp.GradScaler("cpu")
    fresh.load_checkpoint(filename)
    assert fresh.current_epoch == 7
    _assert_same_state(fresh.network.state_dict(), trainer.network.state_dict())
    assert str(fresh.optimizer.state_dict()) == str(trainer.optimizer.state_dict())
    assert fresh.grad_scaler.state_dict() == trainer.grad_scaler.state_dict()
    assert fresh.grad_scaler.get_scale() == 1024.0
    assert "WARNING" not in _log(fresh)


def test_missing_and_damaged_checkpoints_name_the_files_that_exist(trainer):
    folder = trainer.output_folder
    with pytest.raises(CheckpointError, match="checkpoint_final.pth does not exist.*holds no checkpoint"):
        trainer.load_checkpoint(os.path.join(folder, "checkpoint_final.pth"))
    trainer.save_checkpoint(os.path.join(folder, "checkpoint_best.pth"))
    with open(os.path.join(folder, "checkpoint_latest.pth"), "wb") as handle:
        handle.write(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as error:
        trainer.load_checkpoint(os.path.join(folder, "checkpoint_latest.pth"))
    message = str(error.value)
    assert "cannot be read" in message and "checkpoint_best.pth, checkpoint_latest.pth" in message
    assert "\n" not in message


def test_other_plugin_version_is_stated_and_the_checkpoint_loads(trainer):
    filename = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.current_epoch = 2
    trainer.save_checkpoint(filename)
    checkpoint = torch.load(filename, weights_only=False)
    checkpoint[CHECKPOINT_KEY]["version"] = "0.0.7"
    torch.save(checkpoint, filename)
    trainer.load_checkpoint(filename)
    assert trainer.current_epoch == 3
    assert f"written by nnunetv2-mamba 0.0.7, an older version than the installed {__version__}" in _log(trainer)
    del checkpoint[CHECKPOINT_KEY]
    trainer.load_checkpoint(checkpoint)  # a dict, as nnU-Net's signature allows
    assert "without a nnunetv2-mamba version" in _log(trainer)


def test_continue_without_checkpoint_says_which_files_exist(trainer, monkeypatch):
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    sibling = os.path.join(os.path.dirname(trainer.output_folder), "fold_1")
    os.makedirs(sibling)
    open(os.path.join(sibling, "checkpoint_latest.pth"), "wb").close()
    trainer.on_train_start()
    assert "--c was given" not in _log(trainer), "no message without --c"
    trainer.logger.resume = True
    trainer.on_train_start()
    log = _log(trainer)
    assert "--c was given but there is no checkpoint to continue from" in log
    assert "fold_0 holds no checkpoint; other folds: fold_1: checkpoint_latest.pth" in log
    assert "-tr and -p of the run to continue" in log


def test_checkpoint_never_stores_the_scan_backend(trainer, monkeypatch):
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "torch")
    _train(trainer)
    filename = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(filename)
    checkpoint = torch.load(filename, weights_only=False)
    names = set(backend_names())
    assert "torch" in names

    def strings(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield str(key)
                yield from strings(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    found = [s for s in strings({k: v for k, v in checkpoint.items() if k != "network_weights"})
             if s in names or "backend" in s.lower()]
    assert found == []
    assert [k for k in checkpoint["network_weights"] if "backend" in k] == []


# ------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------------------------

def _nan_loss_for(trainer, monkeypatch, bad_calls):
    """Make the loss NaN on the calls (0-based) listed in bad_calls."""
    loss = trainer.loss
    calls = {"n": 0}

    def patched(output, target):
        value = loss(output, target)
        calls["n"] += 1
        return value * float("nan") if calls["n"] - 1 in bad_calls else value
    monkeypatch.setattr(trainer, "loss", patched)


def test_nonfinite_loss_skips_the_step_and_is_logged(trainer, monkeypatch):
    trainer.current_epoch = 4
    trainer._iteration_in_epoch = 0
    _nan_loss_for(trainer, monkeypatch, bad_calls={1, 2})
    trainer.network.train()
    outputs = [trainer.train_step(make_batch(trainer, seed=0))]
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    optimizer_state = str(trainer.optimizer.state_dict())
    for seed in (1, 2):
        outputs.append(trainer.train_step(make_batch(trainer, seed=seed)))
        _assert_same_state(trainer.network.state_dict(), weights)
        assert str(trainer.optimizer.state_dict()) == optimizer_state
    assert all(p.grad is None for p in trainer.network.parameters()), "no backward for a skipped step"
    outputs.append(trainer.train_step(make_batch(trainer, seed=3)))
    assert any(not torch.equal(v, weights[k]) for k, v in trainer.network.state_dict().items())
    log = _log(trainer)
    assert "Non-finite loss (nan) at epoch 4 iteration 1: step skipped (1 in a row, 1 in this run)" in log
    assert "at epoch 4 iteration 2: step skipped (2 in a row, 2 in this run)" in log
    assert trainer.nonfinite_losses.skipped == [(4, 1), (4, 2)] and trainer.nonfinite_losses.consecutive == 0
    trainer.on_train_epoch_end(outputs)
    assert "2 of 4 training steps of epoch 4 were skipped" in _log(trainer)
    assert np.isfinite(trainer.logger.get_value("train_losses", step=-1))


def test_nonfinite_loss_does_not_touch_the_grad_scaler(trainer, monkeypatch):
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    _nan_loss_for(trainer, monkeypatch, bad_calls={0})
    _train(trainer)
    assert trainer.grad_scaler.get_scale() == 256.0
    _train(trainer, seed=1)  # a finite step goes through the scaler
    assert trainer.grad_scaler._growth_tracker.item() == 1


def test_a_run_of_nonfinite_losses_stops_training(trainer, monkeypatch):
    monkeypatch.setattr(nnUNetTrainerUMambaBot, "max_consecutive_nonfinite_losses", 3)
    _nan_loss_for(trainer, monkeypatch, bad_calls={0, 2, 3, 4})
    trainer.network.train()
    trainer.train_step(make_batch(trainer))
    trainer.train_step(make_batch(trainer))  # finite: the run starts again
    trainer.train_step(make_batch(trainer))
    trainer.train_step(make_batch(trainer))
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite .* from epoch 0 iteration 2 to epoch 0 "
                                                 "iteration 4 \\(4 skipped steps in this run\\)"):
        trainer.train_step(make_batch(trainer))


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerUMambaBotNoAMP, nnUNetTrainerLoGVMambaPaperRecipe])
def test_fp32_and_own_recipe_steps_skip_nonfinite_losses(trainer_class, tmp_path, monkeypatch):
    if trainer_class is nnUNetTrainerLoGVMambaPaperRecipe:  # its own train_step, LoG-VMamba's test plans
        from tests.test_logvmamba_trainers import make_batch as make_logvmamba_batch
        from tests.test_logvmamba_trainers import make_trainer as make_logvmamba_trainer
        trainer, batch = make_logvmamba_trainer(trainer_class, tmp_path, monkeypatch), make_logvmamba_batch
    else:
        trainer, batch = make_trainer(trainer_class, "3d_fullres", tmp_path, monkeypatch), make_batch
    _nan_loss_for(trainer, monkeypatch, bad_calls={0})
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.network.train()
    trainer.train_step(batch(trainer))
    _assert_same_state(trainer.network.state_dict(), weights)
    assert trainer.nonfinite_losses.skipped == [(0, 0)]


# ------------------------------------------------------------------------------------------------------------
# Out of GPU memory, determinism
# ------------------------------------------------------------------------------------------------------------

def _raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity "
                                      "of 79.1 GiB of which 1.2 GiB is free.")


@pytest.mark.parametrize("where", ["forward", "loss"])
def test_out_of_memory_in_a_training_step_gives_one_message(trainer, monkeypatch, where):
    if where == "forward":
        monkeypatch.setattr(type(trainer.network), "forward", _raise_oom)
    else:
        monkeypatch.setattr(trainer, "loss", _raise_oom)
    with pytest.raises(MambaOutOfMemoryError) as error:
        trainer.train_step(make_batch(trainer))
    message = str(error.value)
    assert "Out of GPU memory in the training step of " in message
    assert "UMambaBot" in message or "U-Mamba-Bot" in message
    assert "patch size [8, 16, 16], batch size 2" in message and "tried to allocate 2.50 GiB" in message
    assert "nnunetv2_mamba plan --gpu-memory" in message and "NoAMP" in message and "\n" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_out_of_memory_at_prediction_gives_one_message(trainer, monkeypatch):
    network = nnUNetTrainerUMambaBot.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 3, enable_deep_supervision=False)
    assert list(network.state_dict()) == [k for k in trainer.network.state_dict()]
    monkeypatch.setattr(type(network), "forward", _raise_oom)
    network.eval()
    with pytest.raises(MambaOutOfMemoryError, match=r"prediction step of UMambaBot \(patch size \[8, 16, 16\], "
                                                     r"batch size 1\): it tried to allocate 2.50 GiB"):
        network(torch.zeros(1, 1, 8, 16, 16))
    copy = __import__("copy").deepcopy(network)
    assert copy.forward.__self__ is copy, "a copied network keeps its own guarded forward"


def test_two_seeded_cpu_runs_give_identical_weights(tmp_path, monkeypatch):
    torch.use_deterministic_algorithms(True)
    try:
        states = []
        for run in range(2):
            torch.manual_seed(0)
            trainer = make_trainer(nnUNetTrainerUMambaBot, "3d_fullres", tmp_path / str(run), monkeypatch)
            _train(trainer, steps=2)
            states.append(trainer.network.state_dict())
    finally:
        torch.use_deterministic_algorithms(False)
    _assert_same_state(*states)
