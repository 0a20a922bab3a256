"""LoG-VMamba trainers: network building through nnU-Net's entry point, discovery, and the paper recipe."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunetv2_mamba.network_architectures.logvmamba import LoGVMamba
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.trainers.base import NoAMPMixin
from nnunetv2_mamba.schedulers import StepDecayEpochLR
from nnunetv2_mamba.trainers.logvmamba import (nnUNetTrainerGVMamba, nnUNetTrainerLoGVMamba,
                                               nnUNetTrainerLoGVMambaPaperRecipe, nnUNetTrainerLVMamba)
from tests.network_architectures.test_logvmamba import PLANS

TRAINERS = [nnUNetTrainerLoGVMamba, nnUNetTrainerLVMamba, nnUNetTrainerGVMamba, nnUNetTrainerLoGVMambaPaperRecipe]


def configuration_manager(plan_name):
    """Return a duck-typed nnU-Net ConfigurationManager for one of the test plans (as plans.json stores it)."""
    arch, patch = PLANS[plan_name]
    return SimpleNamespace(network_arch_init_kwargs=copy.deepcopy(arch), patch_size=list(patch),
                           network_arch_init_kwargs_req_import=("conv_op", "norm_op", "dropout_op", "nonlin"))


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("plan_name", ["2d_4stages", "3d_aniso_5stages"])
def test_build_network_architecture(trainer, plan_name):
    manager = configuration_manager(plan_name)
    kept = copy.deepcopy(manager.network_arch_init_kwargs)
    network = trainer.build_network_architecture(None, manager, 2, 3, enable_deep_supervision=False)
    assert isinstance(network, LoGVMamba)
    assert network.decoder.deep_supervision is False
    assert manager.network_arch_init_kwargs == kept
    expected_variant = {"nnUNetTrainerLVMamba": "L", "nnUNetTrainerGVMamba": "G"}.get(trainer.__name__, "LoG")
    assert network.variant == expected_variant
    roles = {spec.role for spec in network.topology.stages}
    assert roles == ({"L", "LoG", "G"} if expected_variant == "LoG" else {expected_variant})


def test_predictor_style_call_and_clear_error_for_too_few_stages():
    manager = configuration_manager("3d_4stages")
    network = nnUNetTrainerLoGVMamba.build_network_architecture(None, manager, 1, 2, False)
    with torch.no_grad():
        out = network.eval()(torch.randn(1, 1, *manager.patch_size))
    assert out.shape == (1, 2, *manager.patch_size)
    manager.network_arch_init_kwargs.update(n_stages=2, features_per_stage=[16, 16], strides=[[1, 1, 1], [2, 2, 2]],
                                            kernel_sizes=[[3, 3, 3]] * 2, n_conv_per_stage=[1, 1],
                                            n_conv_per_stage_decoder=[1])
    with pytest.raises(PlanError, match="n_stages=2"):
        nnUNetTrainerLoGVMamba.build_network_architecture(None, manager, 1, 2, False)


def test_trainers_are_discovered_and_concrete():
    from nnunetv2_mamba.trainers.discovery import concrete_trainers
    found = dict(concrete_trainers())
    for trainer in TRAINERS:
        assert found.get(trainer.__name__) is trainer
        assert trainer._do_i_compile(object.__new__(trainer)) is False
    assert issubclass(nnUNetTrainerLoGVMambaPaperRecipe, NoAMPMixin)


def paper_recipe_trainer(num_epochs=200):
    """Return a PaperRecipe trainer object with just the attributes its recipe methods use (no nnU-Net set-up)."""
    trainer = object.__new__(nnUNetTrainerLoGVMambaPaperRecipe)
    trainer.network = nnUNetTrainerLoGVMambaPaperRecipe.build_network_architecture(
        None, configuration_manager("3d_4stages"), 2, 3, False)
    trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = 1e-4, 1e-4, num_epochs
    trainer.device = torch.device("cpu")
    return trainer


def test_paper_recipe_optimizer_and_milestone():
    trainer = paper_recipe_trainer()
    assert nnUNetTrainerLoGVMambaPaperRecipe.reference_num_epochs == 200
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and isinstance(scheduler, StepDecayEpochLR)
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 1e-4
    assert not optimizer.defaults.get("decoupled_weight_decay", False)  # L2 as the reference, not AdamW
    assert trainer.lr_decay_milestone() == 140
    scheduler.step(139)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    scheduler.step(140)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_paper_recipe_train_step_is_fp32_and_clips_at_25(monkeypatch):
    trainer = paper_recipe_trainer()
    trainer.optimizer, _ = trainer.configure_optimizers()
    seen = {}

    def loss(output, target):
        seen["output_dtype"] = output.dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return torch.nn.functional.cross_entropy(output, target[:, 0].long())

    trainer.loss = loss
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        seen["max_norm"] = max_norm
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    before = [p.detach().clone() for p in trainer.network.parameters() if p.requires_grad]
    batch = {"data": torch.randn(1, 2, 16, 16, 16).bfloat16(),
             "target": torch.randint(0, 3, (1, 1, 16, 16, 16)).float()}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the step must switch autocast off itself
        result = trainer.train_step(batch)
    assert np.isfinite(result["loss"])
    assert seen == {"output_dtype": torch.float32, "autocast": False, "max_norm": 25.0}
    after = [p for p in trainer.network.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# ------------------------------------------------------------------------------------------------------------
# Real nnU-Net trainers (constructor, initialize, train/validation steps) on in-memory plans
# ------------------------------------------------------------------------------------------------------------

DATASET_NAME = "Dataset986_LoGVMambaTrainerTest"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def make_plans(plan="3d_4stages", configuration="3d_fullres"):
    """Return a plans dict (as nnU-Net 2.8 writes plans.json) whose configuration holds a test plan.

    ``plan`` is a name of tests.network_architectures.test_logvmamba.PLANS or an (arch_kwargs, patch_size) pair.
    """
    arch, patch = PLANS[plan] if isinstance(plan, str) else plan
    dim = len(patch)
    return {
        "dataset_name": DATASET_NAME, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [2 * p for p in patch],
            "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": copy.deepcopy(arch),
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                  "percentile_99_5": 1.0, "std": 1.0}},
    }


def make_trainer(trainer_class, tmp_path, monkeypatch, plan="3d_4stages", configuration="3d_fullres",
                 device="cpu"):
    """Return an initialised nnU-Net trainer for the in-memory plans (nnU-Net folders under tmp_path)."""
    for variable in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    # initialize() only looks at the preprocessed folder's file endings to pick the dataset class.
    data_folder = tmp_path / "nnUNet_preprocessed" / DATASET_NAME / f"nnUNetPlans_{configuration}"
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "case_000.b2nd").touch()
    plans = make_plans(plan, configuration)
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key before constructing
    trainer = trainer_class(plans, configuration, 0, copy.deepcopy(DATASET_JSON), torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(trainer, batch_size=2, seed=0):
    """Return a training batch as nnU-Net's data loader makes it without deep supervision."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(batch_size, trainer.num_input_channels, *patch, generator=generator)
    target = torch.randint(0, 3, (batch_size, 1, *patch), generator=generator).float()
    return {"data": data, "target": target}


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerLoGVMamba, nnUNetTrainerLoGVMambaPaperRecipe],
                         ids=lambda cls: cls.__name__)
def test_real_trainer_steps_without_deep_supervision(trainer_class, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(trainer_class, tmp_path, monkeypatch)
    assert trainer.enable_deep_supervision is False
    assert isinstance(trainer.network, LoGVMamba) and trainer.network.decoder.deep_supervision is False
    assert type(trainer.loss).__name__ != "DeepSupervisionWrapper"
    if trainer_class is nnUNetTrainerLoGVMambaPaperRecipe:
        assert trainer.grad_scaler is None and trainer.num_epochs == 200
        assert isinstance(trainer.optimizer, torch.optim.Adam)
        assert trainer.lr_scheduler.milestone == 140
    else:
        assert isinstance(trainer.optimizer, torch.optim.SGD)  # nnU-Net's recipe
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    trainer.network.train()
    result = trainer.train_step(make_batch(trainer))
    assert np.isfinite(result["loss"])
    changed = [name for name, p in trainer.network.named_parameters() if not torch.equal(p, before[name])]
    assert any(".self_attention." in name for name in changed)
    trainer.network.eval()
    assert np.isfinite(trainer.validation_step(make_batch(trainer, seed=1))["loss"])
