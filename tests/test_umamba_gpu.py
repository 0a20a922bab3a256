"""GPU: real nnU-Net training steps of every U-Mamba trainer with the mamba_ssm backend (fp16 AMP + GradScaler
for the default trainers, fp32 for NoAMP): finite loss, finite gradients, parameters updated."""
import numpy as np
import pytest
import torch

from nnunetv2_mamba.ssm import get_backend
from tests.amp_training import train_until_steps_are_applied
from nnunetv2_mamba.trainers.base import NoAMPMixin
from nnunetv2_mamba.trainers.umamba import (nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP,
                                            nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaEncNoAMP)
from tests.test_umamba_trainers import make_batch, make_trainer

pytestmark = pytest.mark.gpu

requires_mamba_ssm = pytest.mark.skipif(not get_backend("mamba_ssm").available(),
                                        reason="mamba_ssm is not installed")


@requires_mamba_ssm
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
@pytest.mark.parametrize("trainer_class", [nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaBot,
                                           nnUNetTrainerUMambaEncNoAMP, nnUNetTrainerUMambaBotNoAMP])
def test_training_steps_with_mamba_ssm_backend(trainer_class, configuration, tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "mamba_ssm")  # forced: fails instead of falling back
    torch.manual_seed(0)
    trainer = make_trainer(trainer_class, configuration, tmp_path, monkeypatch, device="cuda")
    uses_amp = not issubclass(trainer_class, NoAMPMixin)
    assert (trainer.grad_scaler is not None) == uses_amp
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    trainer.network.train()
    # Early GradScaler skips are allowed (see tests/amp_training.py); steps must then be applied.
    train_until_steps_are_applied(trainer, make_batch)
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    changed = [name for name, p in trainer.network.named_parameters() if not torch.equal(p, before[name])]
    assert any(".mamba." in name for name in changed)
    trainer.network.eval()
    assert np.isfinite(trainer.validation_step(make_batch(trainer, seed=9))["loss"])
