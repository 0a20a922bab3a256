"""Region-based (BraTS-style) training steps of U-Mamba, Taming Mambas and G-VMamba trainers: nnU-Net's region
loss and one head per region."""
import numpy as np
import pytest
import torch

import tests.trainers.test_umamba as umamba_tests
from tests.builders import make_batch, make_trainer
from nnunetv2_mamba.trainers.discovery import concrete_trainers

REGION_DATASET_JSON = {**umamba_tests.DATASET_JSON, "labels": {"background": 0, "object": [1, 2], "right": [2]},
                       "regions_class_order": [1, 2]}
# Cheap trainers of three families on the CPU (the tiny plans of the U-Mamba tests; LoG-VMamba's LTX needs 16-channel
# groups, so its G-only variant runs; Vivim takes minutes here and is left out). The end-to-end region run is
# tests/nnunetv2_mamba/test_challenge_e2e.py.
TRAINERS = ["nnUNetTrainerUMambaBot", "nnUNetTrainerSegMambaSkipNNUNetRecipe", "nnUNetTrainerGVMamba"]


def region_batch(trainer, seed):
    """A batch as nnU-Net's loader makes it for regions: one binary channel per region at every DS scale."""
    batch = make_batch(trainer, seed=seed)
    regions = trainer.label_manager.foreground_regions

    def to_regions(labels):
        return torch.cat([torch.isin(labels, torch.tensor(region, dtype=labels.dtype)).float()
                          for region in regions], dim=1)

    target = batch["target"]
    batch["target"] = [to_regions(t) for t in target] if isinstance(target, list) else to_regions(target)
    return batch


@pytest.mark.parametrize("trainer_name", TRAINERS)
def test_region_training_and_validation_step(trainer_name, tmp_path, monkeypatch):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    torch.manual_seed(0)
    trainer = make_trainer(dict(concrete_trainers())[trainer_name], umamba_tests.make_plans(), "3d_fullres",
                           REGION_DATASET_JSON, tmp_path, monkeypatch)
    assert trainer.label_manager.has_regions and trainer.label_manager.num_segmentation_heads == 2
    loss = getattr(trainer.loss, "loss", trainer.loss)  # inside nnU-Net's DeepSupervisionWrapper when DS is on
    assert isinstance(loss, DC_and_BCE_loss)
    trainer.network.train()
    batch = region_batch(trainer, seed=0)
    outputs = trainer.network(batch["data"])
    first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    assert first.shape[1] == 2  # one output channel per region, no background channel
    assert np.isfinite(trainer.train_step(batch)["loss"])
    trainer.network.eval()
    validation = trainer.validation_step(region_batch(trainer, seed=1))
    assert np.isfinite(validation["loss"]) and len(validation["tp_hard"]) == 2
