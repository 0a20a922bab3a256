"""Taming Mambas trainers: discovery, reference recipe (RAdam + epoch schedules), nnU-Net recipe variants,
network building through nnU-Net's 2.8 signature, and the 3D-only check of MultiSegMamba."""
import math

import numpy as np

import pytest
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.network_architectures import taming as taming_networks
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.schedulers import CosineAnnealingEpochLR, OneCycleEpochLR
from nnunetv2_mamba.trainers import discovery
from nnunetv2_mamba.trainers import taming

from tests.network_architectures.test_taming import PLANS, _ConfigurationManager

REFERENCE = {  # trainer: (network class, epochs, schedule) from ARCHITECTURES.md §2.1's table
    "nnUNetTrainerSegMamba": (taming_networks.SegMamba, 1000, "cosine"),
    "nnUNetTrainerBiSegMamba": (taming_networks.BiSegMamba, 300, "cosine"),
    "nnUNetTrainerMultiSegMamba": (taming_networks.MultiSegMamba, 300, "one_cycle"),
    "nnUNetTrainerSegMambaSkip": (taming_networks.SegMambaSkip, 1000, "cosine"),
}


def test_all_taming_trainers_are_discovered_and_concrete():
    found = dict(discovery.concrete_trainers())
    expected = set(REFERENCE) | {f"{name}NNUNetRecipe" for name in REFERENCE} | \
        {f"{name}PeriodicLR" for name in ("nnUNetTrainerSegMamba", "nnUNetTrainerBiSegMamba",
                                          "nnUNetTrainerSegMambaSkip")}
    assert expected <= set(found)
    assert not getattr(taming.nnUNetTrainerTamingMambaBase, "is_concrete")
    for name in expected:
        assert found[name].__module__ == "nnunetv2_mamba.trainers.taming"


@pytest.mark.parametrize("trainer_name", sorted(REFERENCE) + [f"{n}NNUNetRecipe" for n in sorted(REFERENCE)])
def test_build_network_architecture_uses_the_nnunet_28_signature(trainer_name):
    trainer = getattr(taming, trainer_name)
    arch, patch = PLANS["3d_3stages"]
    configuration = _ConfigurationManager(arch, patch)
    network_class = REFERENCE[trainer_name.replace("NNUNetRecipe", "")][0]
    for deep_supervision in (True, False):
        network = trainer.build_network_architecture(None, configuration, 2, 3, deep_supervision)
        assert type(network) is network_class
        assert network.decoder.deep_supervision is deep_supervision
    network = trainer.build_network_architecture(None, configuration, 2, 3)  # predictor-style positional call
    assert network.decoder.deep_supervision is True
    assert trainer._do_i_compile(object.__new__(trainer)) is False


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerMultiSegMamba", "nnUNetTrainerMultiSegMambaNNUNetRecipe"])
def test_multisegmamba_trainers_reject_2d_configurations(trainer_name):
    arch, patch = PLANS["2d_3stages"]
    with pytest.raises(PlanError, match=rf"{trainer_name} \(MultiSegMamba\) supports 3D.*2D.*3d_fullres"):
        getattr(taming, trainer_name).build_network_architecture(None, _ConfigurationManager(arch, patch), 1, 2)


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerSegMamba", "nnUNetTrainerBiSegMamba",
                                          "nnUNetTrainerSegMambaSkip"])
def test_2d_configurations_are_supported(trainer_name):
    arch, patch = PLANS["2d_3stages"]
    network = getattr(taming, trainer_name).build_network_architecture(None, _ConfigurationManager(arch, patch), 1, 2)
    assert network.dim == 2


@pytest.fixture
def light_trainer_init(monkeypatch):
    """Replace nnUNetTrainer.__init__ by the defaults it sets (no plans, folders or dataset needed)."""
    def fake_init(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        self.initial_lr, self.weight_decay, self.num_epochs = 1e-2, 3e-5, 1000
        self.device = device

    monkeypatch.setattr(nnUNetTrainer, "__init__", fake_init)


def _trainer_with_network(trainer_class):
    trainer = trainer_class({}, "3d_fullres", 0, {}, torch.device("cpu"))
    trainer.network = torch.nn.Linear(2, 2)  # the recipe only needs parameters
    return trainer


@pytest.mark.parametrize("trainer_name", sorted(REFERENCE))
def test_reference_recipe(light_trainer_init, trainer_name):
    _, epochs, schedule = REFERENCE[trainer_name]
    trainer = _trainer_with_network(getattr(taming, trainer_name))
    assert (trainer.initial_lr, trainer.weight_decay, trainer.num_epochs) == (3e-4, 3e-5, epochs)
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.RAdam
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 3e-5 and not group.get("decoupled_weight_decay", False)  # coupled L2
    epoch = epochs // 3
    scheduler.step(epoch)
    if schedule == "cosine":
        assert isinstance(scheduler, CosineAnnealingEpochLR)
        expected = 5e-6 + (3e-4 - 5e-6) * (1 + math.cos(math.pi * epoch / epochs)) / 2  # one decay over the run
        assert group["lr"] == pytest.approx(expected)
    else:
        assert isinstance(scheduler, OneCycleEpochLR)
        scheduler.step(0)
        assert group["lr"] == pytest.approx(3e-4 / 25) and group["betas"][0] == pytest.approx(0.95)
        scheduler.step(round(0.1 * epochs) - 1)  # end of warm-up: peak rate, lowest beta1
        assert group["lr"] == pytest.approx(3e-4) and group["betas"][0] == pytest.approx(0.85)


def test_tiny_runs_use_the_shortened_epoch_count(light_trainer_init):
    trainer = _trainer_with_network(taming.nnUNetTrainerSegMamba)
    trainer.num_epochs = 4  # set after __init__, as the e2e tiny trainers do
    _, scheduler = trainer.configure_optimizers()
    scheduler.step(2)
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-6 + (3e-4 - 5e-6) * (1 + math.cos(math.pi / 2)) / 2)


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerSegMambaPeriodicLR", "nnUNetTrainerBiSegMambaPeriodicLR",
                                          "nnUNetTrainerSegMambaSkipPeriodicLR"])
def test_periodic_variants_reproduce_the_reference_cosine(light_trainer_init, trainer_name):
    trainer = _trainer_with_network(getattr(taming, trainer_name))
    optimizer, scheduler = trainer.configure_optimizers()
    scheduler.step(100)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-6)
    scheduler.step(200)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("network_name", sorted(REFERENCE))
def test_nnunet_recipe_variants_keep_nnunet_defaults(light_trainer_init, network_name):
    trainer = _trainer_with_network(getattr(taming, f"{network_name}NNUNetRecipe"))
    assert (trainer.initial_lr, trainer.num_epochs) == (1e-2, 1000)
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.SGD and isinstance(scheduler, PolyLRScheduler)


# --- real nnU-Net trainers (in-memory plans, nnU-Net's own train/validation steps) ----------------------------
DATASET_NAME = "Dataset952_TamingTrainerTest"
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def _configuration(name, patch, features, kernels, strides):
    """Return an nnU-Net 2.8 plans configuration (as in plans.json) with a tiny network."""
    dim, n = len(patch), len(features)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [2 * p for p in patch], "spacing": [1.0] * dim,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1}, "batch_dice": False,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
                "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    }


def make_plans(patch_3d=(4, 16, 16), features_3d=(4, 8, 8, 16)):
    """Return a plans dict (nnU-Net 2.8 plans.json layout) with a 2d and an anisotropic 3d_fullres config."""
    strides_3d = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]][:len(features_3d)]
    kernels_3d = [[1, 3, 3]] + [[3, 3, 3]] * (len(features_3d) - 1)
    return {
        "dataset_name": DATASET_NAME, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [2 * p for p in patch_3d], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": _configuration("2d", (32, 32), (4, 8, 12), [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]]),
            "3d_fullres": _configuration("3d_fullres", patch_3d, features_3d, kernels_3d, strides_3d),
        },
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                  "percentile_99_5": 1.0, "std": 1.0}},
    }


def make_trainer(trainer_class, configuration, tmp_path, monkeypatch, device="cpu", plans=None):
    """Return an initialised nnU-Net trainer for in-memory plans (nnU-Net folders under tmp_path)."""
    for variable in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):  # read lazily by nnU-Net 2.8
        monkeypatch.setenv(variable, str(tmp_path / variable))
    data_folder = tmp_path / "nnUNet_preprocessed" / DATASET_NAME / f"nnUNetPlans_{configuration}"
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "case_000.b2nd").touch()  # initialize() picks the dataset class from the file ending
    plans = plans or make_plans()
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key before constructing
    trainer = trainer_class(plans, configuration, 0, dict(DATASET_JSON), torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(trainer, batch_size=2, seed=0, device="cpu"):
    """Return a batch as nnU-Net's loader makes it (one target per deep-supervision scale)."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(batch_size, trainer.num_input_channels, *patch, generator=generator)
    target = torch.randint(0, 3, (batch_size, 1, *patch), generator=generator).float()
    targets = [torch.nn.functional.interpolate(target, size=[int(round(p * s)) for p, s in zip(patch, scale)],
                                               mode="nearest")
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets}


@pytest.mark.parametrize("trainer_name,configuration", [(name, "3d_fullres") for name in sorted(REFERENCE)] +
                         [("nnUNetTrainerSegMambaSkip", "2d")])
def test_real_nnunet_train_and_validation_steps(trainer_name, configuration, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(getattr(taming, trainer_name), configuration, tmp_path, monkeypatch)
    assert type(trainer.optimizer) is torch.optim.RAdam and trainer.optimizer.param_groups[0]["lr"] > 0
    assert trainer.network.decoder.deep_supervision is True
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    trainer.network.train()
    result = trainer.train_step(make_batch(trainer))
    assert np.isfinite(result["loss"])
    # nnU-Net weights the lowest-resolution output 0 and skips it: only that seg head may lack a gradient.
    lowest_seg = {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
    missing = [name for name, p in trainer.network.named_parameters() if p.grad is None]
    assert set(missing) <= lowest_seg, missing
    changed = {name for name, p in trainer.network.named_parameters() if not torch.equal(p, before[name])}
    assert any(".mamba." in name and "A_log" in name for name in changed)
    trainer.network.eval()
    validation = trainer.validation_step(make_batch(trainer, seed=1))
    assert np.isfinite(validation["loss"]) and len(validation["tp_hard"]) == 2
