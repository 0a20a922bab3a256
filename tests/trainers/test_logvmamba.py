"""LoG-VMamba trainers: network building through nnU-Net's entry point, discovery, and the paper recipe."""
import copy

import numpy as np
import pytest
import torch

from nnunetv2_mamba.network_architectures.logvmamba import LoGVMamba
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.trainers.base import NoAMPMixin
from nnunetv2_mamba.schedulers import StepDecayEpochLR
from nnunetv2_mamba.trainers.logvmamba import (nnUNetTrainerGVMamba, nnUNetTrainerLoGVMamba,
                                               nnUNetTrainerLoGVMambaPaperRecipe, nnUNetTrainerLVMamba)
from tests import builders
from tests.builders import make_batch, make_trainer
from tests.network_architectures.test_logvmamba import PLANS

TRAINERS = [nnUNetTrainerLoGVMamba, nnUNetTrainerLVMamba, nnUNetTrainerGVMamba, nnUNetTrainerLoGVMambaPaperRecipe]


def configuration_manager(plan_name):
    """Return nnU-Net's ConfigurationManager for one of the test plans (a copy, as plans.json stores it)."""
    arch, patch = PLANS[plan_name]
    return builders.configuration_manager(copy.deepcopy(arch), patch)


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


def make_plans(plan="3d_4stages", configuration_name="3d_fullres"):
    """Return a plans dict (as nnU-Net 2.8 writes plans.json) whose configuration holds a test plan.

    ``plan`` is a name of tests.network_architectures.test_logvmamba.PLANS or an (arch_kwargs, patch_size) pair.
    """
    arch, patch = PLANS[plan] if isinstance(plan, str) else plan
    return builders.make_plans(DATASET_NAME, {
        configuration_name: builders.configuration(patch, copy.deepcopy(arch), configuration_name)})


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerLoGVMamba, nnUNetTrainerLoGVMambaPaperRecipe],
                         ids=lambda cls: cls.__name__)
def test_real_trainer_steps_without_deep_supervision(trainer_class, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(trainer_class, make_plans(), "3d_fullres", DATASET_JSON, tmp_path, monkeypatch)
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
