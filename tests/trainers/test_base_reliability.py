"""The trainers' reliability layer (trainers/base.py): atomic checkpoints with nnU-Net's content, clear load
errors, the plugin version, skipped non-finite steps, the out-of-memory message, deterministic CPU steps."""
import copy
import glob
from pathlib import Path
import io
import os

import numpy as np
import pytest
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.reliability import (CHECKPOINT_KEY, CheckpointError, MambaOutOfMemoryError,
                                        NonFiniteLossError)
from nnunetv2_mamba.ssm.scan import backend_names
from nnunetv2_mamba.trainers.logvmamba import nnUNetTrainerLoGVMambaPaperRecipe
from nnunetv2_mamba.trainers.umamba import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP
from nnunetv2_mamba.version import __version__
from tests import builders
from tests.builders import make_batch
from tests.trainers import test_logvmamba, test_umamba


def make_trainer(trainer_class, configuration, tmp_path, monkeypatch, device="cpu"):
    """Return an initialised trainer on the U-Mamba tests' tiny plans."""
    return builders.make_trainer(trainer_class, test_umamba.make_plans(), configuration, test_umamba.DATASET_JSON,
                                 tmp_path, monkeypatch, device)


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


def test_checkpoint_of_another_network_is_one_clear_error(trainer):
    filename = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(filename)
    checkpoint = torch.load(filename, weights_only=False)
    checkpoint[CHECKPOINT_KEY]["version"] = "9.0.0"
    checkpoint["network_weights"]["decoder.extra.weight"] = torch.zeros(1)
    del checkpoint["network_weights"]["decoder.seg_layers.0.weight"]
    with pytest.raises(CheckpointError) as error:
        trainer.load_checkpoint(checkpoint)
    message = str(error.value)
    assert "does not fit UMambaBot of nnUNetTrainerUMambaBot with this plan (1 missing, 1 unexpected" in message
    assert "nnunetv2-mamba 9.0.0, a newer version" in message and "\n" not in message


def test_continue_without_checkpoint_says_which_files_exist(trainer, monkeypatch):
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    sibling = os.path.join(os.path.dirname(trainer.output_folder), "fold_1")
    os.makedirs(sibling)
    open(os.path.join(sibling, "checkpoint_latest.pth"), "wb").close()
    other_run = os.path.join(os.path.dirname(os.path.dirname(trainer.output_folder)),
                             "nnUNetTrainerUMambaEnc__nnUNetPlans__3d_fullres", "fold_0")
    os.makedirs(other_run)
    open(os.path.join(other_run, "checkpoint_best.pth"), "wb").close()
    trainer.on_train_start()
    assert "--c was given" not in _log(trainer), "no message without --c"
    trainer.logger.resume = True
    trainer.on_train_start()
    log = _log(trainer)
    assert "--c was given but there is no checkpoint to continue from" in log
    assert "fold_0 holds no checkpoint; other folds: fold_1: checkpoint_latest.pth" in log
    assert "Runs of this dataset with checkpoints: nnUNetTrainerUMambaEnc__nnUNetPlans__3d_fullres/fold_0." in log
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


def test_channel_count_mismatch_between_plans_and_data_is_one_line(trainer):
    batch = make_batch(trainer)
    batch["data"] = torch.cat([batch["data"], batch["data"]], dim=1)
    with pytest.raises(PlanError) as error:
        trainer.train_step(batch)
    message = str(error.value)
    assert message.startswith("The preprocessed data has 2 input channels but the plans and dataset.json declare 1 ")
    assert "{'0': 'MRI'}" in message and "nnUNetv2_plan_and_preprocess" in message and "\n" not in message


def test_forced_backend_is_checked_before_training_starts(trainer, monkeypatch):
    from nnunetv2_mamba.ssm.scan import BACKEND_ENV_VAR, BackendError, get_backend
    started = []
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: started.append(True))
    monkeypatch.setenv(BACKEND_ENV_VAR, "mamba-ssm")
    with pytest.raises(BackendError, match="Unknown selective-scan backend 'mamba-ssm'. Did you mean 'mamba_ssm'"):
        trainer.on_train_start()
    unavailable = get_backend("mamba_ssm").unavailable_reason()
    if unavailable is not None:  # this machine: not installed or no GPU
        monkeypatch.setenv(BACKEND_ENV_VAR, "mamba_ssm")
        with pytest.raises(BackendError, match="'mamba_ssm' was requested .* cannot be used"):
            trainer.on_train_start()
    assert started == []
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    trainer.on_train_start()
    assert started == [True]


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
        trainer = builders.make_trainer(trainer_class, test_logvmamba.make_plans(), "3d_fullres",
                                        test_logvmamba.DATASET_JSON, tmp_path, monkeypatch)
        batch = make_batch
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
    assert isinstance(error.value, torch.cuda.OutOfMemoryError), "handlers of torch's OOM still catch it"
    assert message.count("Out of GPU memory") == 1


def test_out_of_memory_at_prediction_gives_one_message(trainer, monkeypatch):
    network = nnUNetTrainerUMambaBot.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 3, enable_deep_supervision=False)
    assert list(network.state_dict()) == [k for k in trainer.network.state_dict()]
    monkeypatch.setattr(type(network), "forward", _raise_oom)
    network.eval()
    with pytest.raises(MambaOutOfMemoryError, match=r"inference \(validation or prediction\) step of UMambaBot "
                                                     r"\(patch size \[8, 16, 16\], batch size 1\): it tried to "
                                                     r"allocate 2.50 GiB"):
        network(torch.zeros(1, 1, 8, 16, 16))
    copied = copy.deepcopy(network)
    assert copied.forward.__self__ is copied, "a copied network keeps its own guarded forward"


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


# ------------------------------------------------------------------------------------------------------------
# End to end: SIGKILL mid-epoch, resume with --c; the same predictions with two thread counts
# ------------------------------------------------------------------------------------------------------------

RESUME_TRAINER = "nnUNetTrainerUMambaBot_resume"  # tests/e2e/trainers: 3 epochs x 2 iterations, save_every 1
RESUME_DATASET = 989


def _training_logs(fold_folder):
    return sorted(glob.glob(os.path.join(fold_folder, "training_log_*.txt")))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    import re
    import signal
    import subprocess
    import time

    from nnunetv2_mamba.data.synthetic import make_synthetic_dataset
    from tests.e2e.helpers import nnunet_command, nnunet_env, run_step

    root = tmp_path_factory.mktemp("resume")
    env = nnunet_env(root)
    dataset_dir = make_synthetic_dataset(env["nnUNet_raw"], RESUME_DATASET, shape=(16, 16, 16))
    logs = root / "logs"
    run_step("plan_and_preprocess", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(RESUME_DATASET),
                                     "-c", "3d_fullres", "-np", "1"], env, logs)
    train = [nnunet_command("nnUNetv2_train"), str(RESUME_DATASET), "3d_fullres", "0", "-tr", RESUME_TRAINER,
             "-device", "cpu"]
    train_env = {**env, "nnUNet_n_proc_DA": "0"}  # no augmentation workers: the kill hits the only process
    with open(logs / "killed_train.log", "w") as output:
        process = subprocess.Popen(train, env=train_env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.time() + 600
        fold_folder = None
        try:
            while time.time() < deadline and process.poll() is None:
                found = glob.glob(str(root / "nnUNet_results" / "*" / f"{RESUME_TRAINER}__*" / "fold_0"))
                if found:
                    fold_folder = found[0]
                    text = "".join(open(f).read() for f in _training_logs(fold_folder))
                    # "Epoch 2" is logged after epoch 1's checkpoint_latest.pth: kill inside epoch 2.
                    if re.search(r": Epoch 2\s*\n", text):
                        break
                time.sleep(0.05)
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL, (logs / "killed_train.log").read_text()[-3000:]
    assert fold_folder is not None
    killed_state = {"files": sorted(os.listdir(fold_folder)),
                    "latest": torch.load(os.path.join(fold_folder, "checkpoint_latest.pth"), weights_only=False)}
    first_logs = _training_logs(fold_folder)
    resume_output = run_step("resume", train + ["--c"], train_env, logs)
    return {"fold_folder": fold_folder, "killed": killed_state, "first_logs": first_logs, "env": env,
            "resume_output": resume_output, "dataset_dir": dataset_dir}


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_continue_resumes_and_finishes_the_schedule(killed_and_resumed):
    import re
    fold_folder = killed_and_resumed["fold_folder"]
    killed = killed_and_resumed["killed"]
    assert "checkpoint_final.pth" not in killed["files"], "the kill must come before the end of training"
    assert killed["latest"]["current_epoch"] == 2, "epoch 1's checkpoint_latest.pth is the last one written"
    final = torch.load(os.path.join(fold_folder, "checkpoint_final.pth"), weights_only=False)
    assert final["current_epoch"] == 3 and final[CHECKPOINT_KEY]["version"] == __version__
    # The logger was restored: one entry per epoch 0..2, the first two those of the killed run.
    assert len(final["logging"]["train_losses"]) == 3
    assert final["logging"]["train_losses"][:2] == killed["latest"]["logging"]["train_losses"][:2]
    # (That the optimizer and GradScaler state come back exactly is test_load_checkpoint_restores_...)
    resumed_logs = [f for f in _training_logs(fold_folder) if f not in killed_and_resumed["first_logs"]]
    assert len(resumed_logs) == 1
    resumed = open(resumed_logs[0]).read()
    epochs = [int(e) for e in re.findall(r": Epoch (\d+)\s*\n", resumed)]
    assert epochs == [2], "the resumed run trains epoch 2 only"
    # The poly schedule continues at epoch 2 of 3: lr = 1e-2 * (1 - 2/3) ** 0.9.
    assert f"Current learning rate: {np.round(1e-2 * (1 - 2 / 3) ** 0.9, decimals=5)}" in resumed
    assert "Training done." in resumed
    assert [name for name in os.listdir(fold_folder) if name.endswith(".tmp")] == []


def _dice_per_class(a, b, labels):
    """Dice of two segmentations per label; 1 where both lack the label (they agree)."""
    sizes = {label: np.sum(a == label) + np.sum(b == label) for label in labels}
    return {label: 2 * np.sum((a == label) & (b == label)) / sizes[label] if sizes[label] else 1.0
            for label in labels}


@pytest.mark.e2e
def test_same_prediction_with_two_thread_counts(killed_and_resumed, monkeypatch):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "torch")
    # The predictor finds the test trainer by name, as nnUNetv2_predict would.
    monkeypatch.setenv("nnUNet_extTrainer", killed_and_resumed["env"]["nnUNet_extTrainer"] + os.pathsep +
                       os.environ.get("nnUNet_extTrainer", ""))
    model_folder = os.path.dirname(killed_and_resumed["fold_folder"])
    case = sorted((killed_and_resumed["dataset_dir"] / "imagesTs").glob("*.nii.gz"))[0]
    image, properties = SimpleITKIO().read_images([str(case)])
    threads = torch.get_num_threads()
    segmentations = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                        perform_everything_on_device=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,))
            segmentations.append(predictor.predict_single_npy_array(image, properties))
    finally:
        torch.set_num_threads(threads)
    assert segmentations[0].shape == image.shape[1:]
    dice = _dice_per_class(*segmentations, labels=(1, 2))
    assert all(value >= 0.99 for value in dice.values()), dice


_PREDICT_WITH_BACKEND = """
import sys
import numpy as np
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

model_folder, case, out = sys.argv[1:4]
image, properties = SimpleITKIO().read_images([case])
predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                            perform_everything_on_device=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,))
np.save(out, predictor.predict_single_npy_array(image, properties))
"""


def test_same_prediction_with_the_torch_and_the_triton_backend(killed_and_resumed, tmp_path):
    """The model trained on the CPU predicts the same with the torch scan and with the Triton kernels (run by
    Triton's interpreter on the CPU: the kernels' logic, as the GPU would run it). The backend is chosen at
    prediction time, never stored in the checkpoint."""
    import subprocess
    import sys

    model_folder = os.path.dirname(killed_and_resumed["fold_folder"])
    case = sorted((killed_and_resumed["dataset_dir"] / "imagesTs").glob("*.nii.gz"))[0]
    segmentations = []
    for backend, interpret in (("torch", "0"), ("triton", "1")):
        env = {**os.environ, "NNUNETV2_MAMBA_BACKEND": backend, "TRITON_INTERPRET": interpret,
               "nnUNet_extTrainer": killed_and_resumed["env"]["nnUNet_extTrainer"] + os.pathsep +
               os.environ.get("nnUNet_extTrainer", ""), "OMP_NUM_THREADS": "2"}
        out = tmp_path / f"{backend}.npy"
        done = subprocess.run([sys.executable, "-c", _PREDICT_WITH_BACKEND, model_folder, str(case), str(out)],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        segmentations.append(np.load(out))
    assert segmentations[0].shape == segmentations[1].shape
    dice = _dice_per_class(*segmentations, labels=(1, 2))
    assert all(value >= 0.99 for value in dice.values()), dice


# ------------------------------------------------------------------------------------------------------------
# GPU: every trainer at its default precision and nnU-Net's default plan; GPU-trained, CPU-predicted
# ------------------------------------------------------------------------------------------------------------

def _make_video_dataset(raw, dataset_id):
    """Write a small synthetic video dataset (moving disks, 8 frames of 64 x 64) as nnU-Net raw data."""
    from nnunetv2_mamba.data.synthetic import make_synthetic_videos
    from nnunetv2_mamba.data.video_convert import video_to_nnunet

    sources = Path(raw).parent / "video_sources"
    make_synthetic_videos(sources, n_videos=6, nframes=8, size=(64, 64), seed=0, prefix="train")
    return video_to_nnunet(sources, raw, dataset_id, name="AmpVideos")


def _concrete_trainer_names():
    from nnunetv2_mamba.trainers.discovery import concrete_trainers
    return [name for name, _ in concrete_trainers()]


@pytest.fixture(scope="module")
def amp_datasets(tmp_path_factory):
    """Return prepare(kind) -> (env, dataset id): a planned + preprocessed volume or video dataset.

    $NNUNETV2_MAMBA_AMP_DATASET may name a raw DatasetXXX_Name folder (e.g. real anatomy) used for volumes.
    """
    import re

    from nnunetv2_mamba.data.synthetic import make_synthetic_dataset
    from tests.e2e.helpers import nnunet_command, nnunet_env, run_step

    root = tmp_path_factory.mktemp("amp")
    env = nnunet_env(root)
    prepared = {}

    def prepare(kind):
        if kind not in prepared:
            raw = root / "nnUNet_raw"
            own = os.environ.get("NNUNETV2_MAMBA_AMP_DATASET")
            if kind == "volume" and own:
                dataset_id = int(re.match(r"Dataset(\d+)_", os.path.basename(own.rstrip("/"))).group(1))
                os.symlink(own, raw / os.path.basename(own.rstrip("/")))
            elif kind == "volume":
                dataset_id = 988
                make_synthetic_dataset(raw, dataset_id, shape=(64, 64, 64))
            else:
                dataset_id = 987
                _make_video_dataset(raw, dataset_id)
            run_step(f"plan_{kind}", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                                      "-c", "3d_fullres", "-np", "2"], env, root / "logs")
            if kind == "video":  # Vivim trains on the video configurations the plugin adds to the plans
                run_step("video_plan", [nnunet_command("nnunetv2_mamba"), "video", "plan", "-d", str(dataset_id)],
                         env, root / "logs")
            prepared[kind] = dataset_id
        return env, prepared[kind]
    return prepare


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize("trainer_name", _concrete_trainer_names())
def test_default_precision_gpu_training_has_no_nonfinite_step(trainer_name, amp_datasets):
    """$NNUNETV2_MAMBA_TEST_ITERATIONS (default 500) steps of ``nnUNetv2_train -tr <trainer>_amp``."""
    import re

    from tests.e2e.helpers import nnunet_command, run_step

    env, dataset_id = amp_datasets("video" if "Vivim" in trainer_name else "volume")
    # Vivim trains on the video configurations that `nnunetv2_mamba video plan` adds, one per mixer.
    configuration = ("3d_fullres_vivim_v3" if trainer_name.endswith("VivimV3") else
                     "3d_fullres_vivim" if "Vivim" in trainer_name else "3d_fullres")
    run_step(f"train_{trainer_name}", [nnunet_command("nnUNetv2_train"), str(dataset_id), configuration, "0",
                                       "-tr", f"{trainer_name}_amp", "-device", "cuda"],
             {**env, "nnUNet_n_proc_DA": "4"}, Path(env["nnUNet_results"]).parent / "logs", timeout=3600)
    fold = glob.glob(os.path.join(env["nnUNet_results"], "*", f"{trainer_name}_amp__*", "fold_0"))[0]
    log = "".join(open(f).read() for f in _training_logs(fold))
    skipped = re.findall(r"Non-finite loss \((.*?)\) at epoch (\d+) iteration (\d+)", log)
    final = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    steps = int(os.environ.get("NNUNETV2_MAMBA_TEST_ITERATIONS", "500"))
    print(f"{trainer_name}: {steps} steps at default precision, {len(skipped)} skipped non-finite: {skipped}")
    assert skipped == [], f"{trainer_name}: {len(skipped)} of {steps} steps had a non-finite loss: {skipped}"
    assert all(np.isfinite(loss) for loss in final["logging"]["train_losses"])
    bad = [k for k, v in final["network_weights"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert bad == []


def _learnable_batch(trainer, batch_size=2, seed=0):
    """A batch whose labels follow from the intensities (0 below -0.5, 1 up to 0.5, 2 above), so that a short
    training gives confident predictions instead of near-ties decided by rounding."""
    batch = make_batch(trainer, batch_size, seed)
    smooth = torch.nn.functional.avg_pool3d(batch["data"], 3, stride=1, padding=1) * 3
    batch["data"] = smooth
    labels = (smooth > -0.5).float() + (smooth > 0.5).float()
    batch["target"] = [torch.nn.functional.interpolate(labels, size=t.shape[2:], mode="nearest")
                       for t in batch["target"]]
    return batch


@pytest.mark.gpu
def test_gpu_trained_network_predicts_the_same_on_cpu(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(nnUNetTrainerUMambaBot, "3d_fullres", tmp_path, monkeypatch, device="cuda")
    assert trainer.grad_scaler is not None, "default AMP training on the GPU"
    monkeypatch.delenv("NNUNETV2_MAMBA_BACKEND", raising=False)  # the fastest backend here (mamba_ssm if any)
    trainer.network.train()
    for step in range(50):
        trainer.train_step(_learnable_batch(trainer, seed=step))
    filename = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(filename)
    checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    gpu_network = nnUNetTrainerUMambaBot.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 3, enable_deep_supervision=False).cuda().eval()
    gpu_network.load_state_dict(checkpoint["network_weights"])
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "torch")
    cpu_network = nnUNetTrainerUMambaBot.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 3, enable_deep_supervision=False).eval()
    cpu_network.load_state_dict(checkpoint["network_weights"])
    x = _learnable_batch(trainer, batch_size=4, seed=100)["data"]
    with torch.no_grad():
        monkeypatch.delenv("NNUNETV2_MAMBA_BACKEND")
        with torch.autocast("cuda"):  # as nnU-Net's predictor on the GPU
            on_gpu = gpu_network(x.cuda()).float().argmax(1).cpu().numpy()
        monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "torch")
        on_cpu = cpu_network(x).argmax(1).numpy()
    dice = _dice_per_class(on_gpu, on_cpu, labels=(0, 1, 2))
    assert all(value >= 0.99 for value in dice.values()), dice
