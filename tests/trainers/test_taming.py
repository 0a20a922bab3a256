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

from tests import builders
from tests.builders import arch_kwargs, configuration_manager, make_batch, make_trainer
from tests.network_architectures.test_taming import PLANS

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
    configuration = configuration_manager(arch, patch)
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
        getattr(taming, trainer_name).build_network_architecture(None, configuration_manager(arch, patch), 1, 2)


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerSegMamba", "nnUNetTrainerBiSegMamba",
                                          "nnUNetTrainerSegMambaSkip"])
def test_2d_configurations_are_supported(trainer_name):
    arch, patch = PLANS["2d_3stages"]
    network = getattr(taming, trainer_name).build_network_architecture(None, configuration_manager(arch, patch), 1, 2)
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


def make_plans(patch_3d=(4, 16, 16), features_3d=(4, 8, 8, 16)):
    """Return a plans dict (nnU-Net 2.8 plans.json layout) with a 2d and an anisotropic 3d_fullres config."""
    strides_3d = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]][:len(features_3d)]
    kernels_3d = [[1, 3, 3]] + [[3, 3, 3]] * (len(features_3d) - 1)
    plan_2d = arch_kwargs((4, 8, 12), [[1, 1], [2, 2], [2, 2]], kernels=[[3, 3]] * 3, blocks=2, decoder_blocks=2)
    plan_3d = arch_kwargs(features_3d, strides_3d, kernels=kernels_3d, blocks=2, decoder_blocks=2)
    return builders.make_plans(DATASET_NAME, {"2d": builders.configuration((32, 32), plan_2d, "2d"),
                                              "3d_fullres": builders.configuration(patch_3d, plan_3d, "3d_fullres")},
                               original_median_shape=[2 * p for p in patch_3d])


@pytest.mark.parametrize("trainer_name,configuration", [(name, "3d_fullres") for name in sorted(REFERENCE)] +
                         [("nnUNetTrainerSegMambaSkip", "2d")])
def test_real_nnunet_train_and_validation_steps(trainer_name, configuration, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(getattr(taming, trainer_name), make_plans(), configuration, DATASET_JSON, tmp_path,
                           monkeypatch)
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
