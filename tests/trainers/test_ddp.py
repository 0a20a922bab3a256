"""What nnU-Net's DDP (``-num_gpus N``) needs from the plugin, checked on the CPU.

* Every concrete trainer's network gives every trainable parameter a gradient in one real nnU-Net train step with the
  loss nnU-Net builds under DDP (DistributedDataParallel with find_unused_parameters=False, nnU-Net's default, fails
  on the next step otherwise).
* Two gloo processes run nnU-Net's own ``initialize`` (batch split, SyncBatchNorm conversion, DDP wrap, DDP loss)
  and ``train_step``: gradients are averaged (parameters equal across ranks and equal to one process on the
  concatenated batch) and no unused-parameter error occurs.
* The per-rank batch size / oversampling split for world size 2 is nnU-Net's.
* benchmarks/ddp_session.sh (the two-GPU run) is valid bash.
"""
import copy
import functools
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module

from nnunetv2_mamba.data.video_plan import add_vivim_configurations
from nnunetv2_mamba.trainers.discovery import concrete_trainers
from tests.trainers import test_logvmamba, test_taming, test_umamba, test_vivim

REPO = Path(__file__).resolve().parents[2]
TRAINERS = concrete_trainers()


def make_trainer(trainer_class, tmp_path, monkeypatch):
    """Return an initialised trainer of any family on its tiny test plans (3d_fullres or its Vivim configuration)."""
    family = trainer_class.__module__.rsplit(".", 1)[-1]
    if family == "umamba":
        return test_umamba.make_trainer(trainer_class, "3d_fullres", tmp_path, monkeypatch)
    if family == "taming":
        return test_taming.make_trainer(trainer_class, "3d_fullres", tmp_path, monkeypatch)
    if family == "logvmamba":
        return test_logvmamba.make_trainer(trainer_class, tmp_path, monkeypatch)
    assert family == "vivim", f"no tiny plans for the trainer family {family!r} ({trainer_class.__name__})"
    test_vivim.make_trainer_folders(tmp_path, monkeypatch)
    plans = add_vivim_configurations(test_vivim.planned_plans(median=(6, 32, 32)))
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key before constructing
    configuration = "3d_fullres_vivim_v3" if trainer_class.vivim_mixer == "st_v3" else "3d_fullres_vivim"
    trainer = trainer_class(plans, configuration, 0, copy.deepcopy(test_vivim.DATASET_JSON), torch.device("cpu"))
    trainer.initialize()
    return trainer


def make_batch(trainer, batch_size, seed):
    """Return a batch as nnU-Net's data loader makes it (one target per deep-supervision scale when DS is on)."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(batch_size, trainer.num_input_channels, *patch, generator=generator)
    labels = len(trainer.label_manager.all_labels)
    target = torch.randint(0, labels, (batch_size, 1, *patch), generator=generator).float()
    if not trainer.enable_deep_supervision:
        return {"data": data, "target": target}
    return {"data": data, "target": [torch.nn.functional.interpolate(target, size=[round(p * s) for p, s in
                                                                                    zip(patch, scale)])
                                     for scale in trainer._get_deep_supervision_scales()]}


def use_ddp_loss(trainer):
    """Rebuild the trainer's loss as nnU-Net's _build_loss does under DDP (lowest DS output weighted 1e-6, not 0)."""
    trainer.is_ddp = True
    try:
        trainer.loss = trainer._build_loss()
    finally:
        trainer.is_ddp = False  # nothing else of DDP (all_gather in the epoch hooks) applies in one process


# ------------------------------------------------------------------------------------------------------------
# 1. No unused parameters: every trainable parameter gets a gradient in a real train step
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer_class", [cls for _, cls in TRAINERS], ids=[name for name, _ in TRAINERS])
def test_every_parameter_gets_a_gradient_in_a_ddp_train_step(trainer_class, tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trainer = make_trainer(trainer_class, tmp_path, monkeypatch)
    use_ddp_loss(trainer)
    if trainer.enable_deep_supervision:
        assert min(trainer.loss.weight_factors) > 0, "under DDP nnU-Net weights every deep-supervision output"
        assert trainer.network.decoder.deep_supervision is True
    trainer.network.train()
    result = trainer.train_step(make_batch(trainer, batch_size=2, seed=0))
    assert np.isfinite(result["loss"])
    trainable = [(name, p) for name, p in trainer.network.named_parameters() if p.requires_grad]
    assert trainable
    no_gradient = [name for name, p in trainable if p.grad is None]
    assert no_gradient == [], f"{trainer_class.__name__}: parameters without a gradient (DDP with " \
                              f"find_unused_parameters=False fails on them): {no_gradient}"
    not_finite = [name for name, p in trainable if not torch.isfinite(p.grad).all()]
    assert not_finite == [], f"{trainer_class.__name__}: non-finite gradients: {not_finite}"
