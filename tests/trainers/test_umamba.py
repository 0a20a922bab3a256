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
from tests import builders
from tests.builders import arch_kwargs, make_batch, make_trainer

TRAINERS = [nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEncNoAMP,
            nnUNetTrainerUMambaBotNoAMP]
NETWORK_CLASS = {nnUNetTrainerUMambaEnc: UMambaEnc, nnUNetTrainerUMambaBot: UMambaBot,
                 nnUNetTrainerUMambaEncNoAMP: UMambaEnc, nnUNetTrainerUMambaBotNoAMP: UMambaBot}
DATASET_NAME = "Dataset987_UMambaTrainerTest"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "left": 1, "right": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def make_plans():
    """Return a plans dict (as nnU-Net 2.8 writes plans.json) with 2d, 3d_lowres, 3d_fullres and the cascade."""
    fullres_3d = arch_kwargs([4, 8, 8, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                             kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], blocks=2, decoder_blocks=2)
    lowres_3d = arch_kwargs([4, 8, 8], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                            blocks=2, decoder_blocks=2)
    plan_2d = arch_kwargs([4, 8, 12, 16], [[1, 1], [2, 2], [2, 2], [2, 2]], blocks=2, decoder_blocks=2)
    return builders.make_plans(DATASET_NAME, {
        "2d": builders.configuration([32, 32], plan_2d, "2d"),
        "3d_lowres": builders.configuration([8, 16, 16], lowres_3d, "3d_lowres",
                                            next_stage="3d_cascade_fullres"),
        "3d_fullres": builders.configuration([8, 16, 16], fullres_3d, "3d_fullres"),
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }, original_median_shape=[16, 32, 32])


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

@pytest.mark.parametrize("trainer_class,configuration", [(nnUNetTrainerUMambaEnc, "3d_fullres"),
                                                         (nnUNetTrainerUMambaBotNoAMP, "2d"),
                                                         (nnUNetTrainerUMambaEncNoAMP, "3d_lowres")])
def test_real_train_and_validation_steps(trainer_class, configuration, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(trainer_class, make_plans(), configuration, DATASET_JSON, tmp_path, monkeypatch)
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
    trainer = make_trainer(nnUNetTrainerUMambaBotNoAMP, make_plans(), "3d_fullres", DATASET_JSON, tmp_path, monkeypatch)
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
