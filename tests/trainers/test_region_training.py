"""Region-based (BraTS-style) training with every concrete plugin trainer: nnU-Net's region loss, one head per
region, finite train and validation steps, and region logits turned into labels by nnU-Net's label manager.

Each trainer runs on the tiny plans of its own family's tests (the end-to-end region run, one trainer through the
whole pipeline, is tests/e2e/test_challenge.py).
"""
import copy

import numpy as np
import pytest
import torch

from nnunetv2_mamba.data.video_plan import add_vivim_configurations
from nnunetv2_mamba.trainers.discovery import concrete_trainers
from tests.builders import make_batch, make_trainer
from tests.network_architectures.make_fixtures import TINY_VIVIM
from tests.trainers import test_logvmamba, test_taming, test_umamba, test_vivim

TRAINERS = concrete_trainers()
REGION_LABELS = {"labels": {"background": 0, "object": [1, 2], "right": [2]}, "regions_class_order": [1, 2]}


def region_dataset_json(family_tests) -> dict:
    """The family's test dataset.json with BraTS-style regions: object = labels {1, 2}, right = label {2}."""
    return {**copy.deepcopy(family_tests.DATASET_JSON), **copy.deepcopy(REGION_LABELS)}


def tiny_vivim_plans() -> dict:
    """Plans with the Vivim configurations `video plan` adds, their MiT-B3 arch_kwargs cut to tiny MiT widths (the
    trainer builds from the plan's arch_kwargs; at MiT-B3 one CPU step takes minutes)."""
    plans = add_vivim_configurations(test_vivim.planned_plans(median=(6, 32, 32)))
    tiny = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_VIVIM.items()}
    for name in ("3d_fullres_vivim", "3d_fullres_vivim_v3"):
        plans["configurations"][name]["architecture"]["arch_kwargs"].update(tiny)
    return plans


def make_region_trainer(trainer_class, tmp_path, monkeypatch):
    """Return an initialised trainer on its family's tiny test plans (3d_fullres or its Vivim configuration), with
    the region dataset.json."""
    family = trainer_class.__module__.rsplit(".", 1)[-1]
    tests_of_family = {"umamba": test_umamba, "taming": test_taming, "logvmamba": test_logvmamba}
    if family in tests_of_family:
        tests = tests_of_family[family]  # LoG-VMamba's make_plans() has the 16-channel groups its LTX needs
        return make_trainer(trainer_class, tests.make_plans(), "3d_fullres", region_dataset_json(tests), tmp_path,
                            monkeypatch)
    assert family == "vivim", f"no tiny plans for the trainer family {family!r} ({trainer_class.__name__})"
    # The Vivim configurations inherit 3d_fullres's data_identifier: its preprocessed folder must exist as well.
    test_vivim.make_trainer_folders(tmp_path, monkeypatch)
    configuration = "3d_fullres_vivim_v3" if trainer_class.vivim_mixer == "st_v3" else "3d_fullres_vivim"
    return make_trainer(trainer_class, tiny_vivim_plans(), configuration, region_dataset_json(test_vivim), tmp_path,
                        monkeypatch)


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


def expected_segmentation(region_logits: torch.Tensor) -> torch.Tensor:
    """Labels from region logits [object, right] by hand: sigmoid > 0.5 per region, later regions painted over
    earlier ones in regions_class_order (object -> 1, right -> 2)."""
    inside = torch.sigmoid(region_logits) > 0.5
    segmentation = torch.zeros(region_logits.shape[1:], dtype=torch.long)
    segmentation[inside[0]] = 1
    segmentation[inside[1]] = 2
    return segmentation


@pytest.fixture
def one_thread():
    """One torch thread per step (the steps are tiny; threads would only compete with each other), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("trainer_class", [cls for _, cls in TRAINERS], ids=[name for name, _ in TRAINERS])
def test_region_training_validation_and_segmentation(trainer_class, tmp_path, monkeypatch, one_thread):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    torch.manual_seed(0)
    trainer = make_region_trainer(trainer_class, tmp_path, monkeypatch)
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
    validation_batch = region_batch(trainer, seed=1)
    validation = trainer.validation_step(validation_batch)
    assert np.isfinite(validation["loss"]) and len(validation["tp_hard"]) == 2

    # What nnU-Net's predictor does with the network's full-resolution output of one case.
    with torch.no_grad():
        outputs = trainer.network(validation_batch["data"][:1])
    logits = (outputs[0] if isinstance(outputs, (list, tuple)) else outputs)[0].float()
    segmentation = torch.as_tensor(trainer.label_manager.convert_logits_to_segmentation(logits))
    assert tuple(segmentation.shape) == tuple(trainer.configuration_manager.patch_size)
    assert set(torch.unique(segmentation).tolist()) <= {0, 1, 2}
    assert torch.equal(segmentation.long(), expected_segmentation(logits))
