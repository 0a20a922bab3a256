"""U-Mamba trainers: nnU-Net 2.8 build path (training and predictor), every configuration, real train/val steps,
NoAMP variants, discovery, and one end-to-end run through nnU-Net's own commands."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_mamba.network_architectures.umamba import UMambaBot, UMambaEnc, UMambaLayer
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.trainers.base import NoAMPMixin
from nnunetv2_mamba.trainers.discovery import concrete_trainers
from nnunetv2_mamba.trainers.umamba import (nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP,
                                            nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaEncNoAMP)

TRAINERS = [nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEncNoAMP,
            nnUNetTrainerUMambaBotNoAMP]
NETWORK_CLASS = {nnUNetTrainerUMambaEnc: UMambaEnc, nnUNetTrainerUMambaBot: UMambaBot,
                 nnUNetTrainerUMambaEncNoAMP: UMambaEnc, nnUNetTrainerUMambaBotNoAMP: UMambaBot}
DATASET_NAME = "Dataset987_UMambaTrainerTest"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "left": 1, "right": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def _architecture(dim, n_stages, features, kernels, strides):
    """Return the 'architecture' entry of an nnU-Net 2.8 plans configuration."""
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages, "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernels, "strides": strides,
            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _configuration(name, dim, patch, n_stages, features, kernels, strides, **extra):
    """Return an nnU-Net 2.8 plans configuration with a tiny network."""
    configuration = {
        "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": patch, "median_image_size_in_voxels": [2 * p for p in patch],
        "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": _architecture(dim, n_stages, features, kernels, strides), "batch_dice": False,
    }
    configuration.update(extra)
    return configuration


def make_plans():
    """Return a plans dict (as nnU-Net 2.8 writes plans.json) with 2d, 3d_lowres, 3d_fullres and the cascade."""
    return {
        "dataset_name": DATASET_NAME, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [16, 32, 32], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": _configuration("2d", 2, [32, 32], 4, [4, 8, 12, 16], [[3, 3]] * 4,
                                 [[1, 1], [2, 2], [2, 2], [2, 2]]),
            "3d_lowres": _configuration("3d_lowres", 3, [8, 16, 16], 3, [4, 8, 8], [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                                        [[1, 1, 1], [1, 2, 2], [2, 2, 2]], next_stage="3d_cascade_fullres"),
            "3d_fullres": _configuration("3d_fullres", 3, [8, 16, 16], 4, [4, 8, 8, 16],
                                         [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                                         [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                  "percentile_99_5": 1.0, "std": 1.0}},
    }


# ------------------------------------------------------------------------------------------------------------
# build_network_architecture (nnU-Net 2.8 signature): training path and predictor path
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer", [nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaBot])
@pytest.mark.parametrize("configuration", ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"])
def test_predictor_rebuild_gives_same_network_and_plans_stay_unchanged(trainer, configuration):
    plans = make_plans()
    plans_manager = PlansManager(copy.deepcopy(plans))
    configuration_manager = plans_manager.get_configuration(configuration)
    snapshot = copy.deepcopy(configuration_manager.network_arch_init_kwargs)
    # The cascade adds one-hot channels of the previous stage's foreground labels.
    input_channels = 1 + (2 if configuration == "3d_cascade_fullres" else 0)
    training = trainer.build_network_architecture(plans_manager, configuration_manager, input_channels, 3, True)
    # nnU-Net's predictor: a fresh lookup of the (cached) configuration, deep supervision off.
    predicting = trainer.build_network_architecture(plans_manager, plans_manager.get_configuration(configuration),
                                                    input_channels, 3, enable_deep_supervision=False)
    assert isinstance(training, NETWORK_CLASS[trainer])
    assert training.decoder.deep_supervision is True and predicting.decoder.deep_supervision is False
    assert list(training.state_dict().keys()) == list(predicting.state_dict().keys())
    predicting.load_state_dict(training.state_dict())
    assert configuration_manager.network_arch_init_kwargs == snapshot, "plan lists were modified in place"
    assert plans_manager.get_configuration(configuration).network_arch_init_kwargs == snapshot
    patch = configuration_manager.patch_size
    x = torch.randn(1, input_channels, *patch)
    with torch.no_grad():
        torch.testing.assert_close(predicting(x), training(x)[0])
        assert predicting(x).shape == (1, 3, *patch)


def test_enc_dispatches_on_patch_dimension():
    plans_manager = PlansManager(make_plans())
    net2d = nnUNetTrainerUMambaEnc.build_network_architecture(plans_manager, plans_manager.get_configuration("2d"),
                                                              1, 3, False)
    net3d = nnUNetTrainerUMambaEnc.build_network_architecture(
        plans_manager, plans_manager.get_configuration("3d_fullres"), 1, 3, False)
    assert isinstance(net2d.encoder.stem[0].conv1, torch.nn.Conv2d)
    assert isinstance(net3d.encoder.stem[0].conv1, torch.nn.Conv3d)
    # 2D with 4 stages: mixers at stages 1 and 3; 3D: at every stage.
    assert [isinstance(m, UMambaLayer) for m in net2d.encoder.mamba_layers] == [False, True, False, True]
    assert all(isinstance(m, UMambaLayer) for m in net3d.encoder.mamba_layers)


def test_bad_configuration_raises_plan_error_at_construction():
    plans = make_plans()
    plans["configurations"]["3d_fullres"]["patch_size"] = [8, 16, 12]  # 12 is not a multiple of 8
    plans_manager = PlansManager(plans)
    with pytest.raises(PlanError, match=r"patch_size \[8, 16, 12\]"):
        nnUNetTrainerUMambaBot.build_network_architecture(
            plans_manager, plans_manager.get_configuration("3d_fullres"), 1, 3, True)


def test_trainers_are_discovered_and_concrete():
    found = dict(concrete_trainers())
    for trainer in TRAINERS:
        assert found.get(trainer.__name__) is trainer
        assert trainer.supported_dims == (2, 3)
    assert issubclass(nnUNetTrainerUMambaEncNoAMP, NoAMPMixin) and issubclass(nnUNetTrainerUMambaBotNoAMP, NoAMPMixin)
    assert not issubclass(nnUNetTrainerUMambaEnc, NoAMPMixin)


# ------------------------------------------------------------------------------------------------------------
# Real nnU-Net train / validation steps on the CPU
# ------------------------------------------------------------------------------------------------------------

def make_trainer(trainer_class, configuration, tmp_path, monkeypatch, device="cpu"):
    """Return an initialised trainer for the in-memory plans (nnU-Net folders under tmp_path)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    # initialize() only inspects the preprocessed folder's file endings to pick the dataset class.
    data_folder = tmp_path / "preprocessed" / DATASET_NAME / f"nnUNetPlans_{configuration}"
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "case_000.b2nd").touch()
    plans = make_plans()
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key before constructing
    trainer = trainer_class(plans, configuration, 0, copy.deepcopy(DATASET_JSON), torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(trainer, batch_size=2, seed=0):
    """Return a training batch as nnU-Net's data loader makes it (targets per DS scale when DS is on)."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(batch_size, trainer.num_input_channels, *patch, generator=generator)
    target = torch.randint(0, 3, (batch_size, 1, *patch), generator=generator).float()
    if not trainer.enable_deep_supervision:
        return {"data": data, "target": target}
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        size = [int(round(p * s)) for p, s in zip(patch, scale)]
        targets.append(torch.nn.functional.interpolate(target, size=size, mode="nearest"))
    return {"data": data, "target": targets}


@pytest.mark.parametrize("trainer_class,configuration", [(nnUNetTrainerUMambaEnc, "3d_fullres"),
                                                         (nnUNetTrainerUMambaBotNoAMP, "2d"),
                                                         (nnUNetTrainerUMambaEncNoAMP, "3d_lowres")])
def test_real_train_and_validation_steps(trainer_class, configuration, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(trainer_class, configuration, tmp_path, monkeypatch)
    assert trainer._do_i_compile() is False
    assert trainer.network.decoder.deep_supervision is True
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    trainer.network.train()
    result = trainer.train_step(make_batch(trainer))
    assert np.isfinite(result["loss"])
    grads = {name: p.grad for name, p in trainer.network.named_parameters()}
    # nnU-Net skips the lowest-resolution output (weight 0), so only its seg head may lack a gradient.
    lowest_seg = {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
    assert [name for name, g in grads.items() if g is None and name not in lowest_seg] == []
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    changed = [name for name, p in trainer.network.named_parameters() if not torch.equal(p, before[name])]
    assert any("mamba" in name for name in changed), "the optimizer step must update the Mamba parameters"
    trainer.network.eval()
    validation = trainer.validation_step(make_batch(trainer, seed=1))
    assert np.isfinite(validation["loss"]) and len(validation["tp_hard"]) == 2
    if issubclass(trainer_class, NoAMPMixin):
        assert trainer.grad_scaler is None
        assert trainer.network.__class__ is NETWORK_CLASS[trainer_class], "fp32 wrapper must be removed"


def test_noamp_validation_step_with_deep_supervision_off(tmp_path, monkeypatch):
    # Upstream's NoAMP validation_step indexes output[0] unconditionally; ours follows nnU-Net's DS switch.
    trainer = make_trainer(nnUNetTrainerUMambaBotNoAMP, "3d_fullres", tmp_path, monkeypatch)
    trainer.enable_deep_supervision = False
    trainer.set_deep_supervision_enabled(False)
    trainer.loss = trainer._build_loss()
    trainer.network.eval()
    batch = make_batch(trainer)
    assert torch.is_tensor(batch["target"])
    validation = trainer.validation_step(batch)
    assert np.isfinite(validation["loss"]) and len(validation["tp_hard"]) == 2


# ------------------------------------------------------------------------------------------------------------
# End to end through nnU-Net's own commands
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_end_to_end_umamba_enc_3d(tmp_path):
    from tests.e2e.helpers import run_nnunet_pipeline

    # 16^3 images: U-Mamba-Enc scans every voxel of the full-resolution level, so the default 32^3 dataset costs
    # ~8x more on CPU. Same dataset id and shape as the Taming e2e test, so one planning run serves both.
    result = run_nnunet_pipeline(tmp_path, "nnUNetTrainerUMambaEnc", configuration="3d_fullres", dim=3,
                                 dataset_id=951, shape=(16, 16, 16))
    plans = json.loads((Path(result["results_dir"]) / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"] >= 3
    fold = Path(result["results_dir"]) / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerUMambaEnc_tiny"
    weights = checkpoint["network_weights"]
    assert any(key.startswith("encoder.mamba_layers.0.mamba.") for key in weights)
    predictions = sorted(Path(result["predictions_dir"]).glob("*.nii.gz"))
    assert predictions, "the predictor must have rebuilt the network and written segmentations"
    dice = result["summary"]["foreground_mean"]["Dice"]
    assert 0.0 <= dice <= 1.0
