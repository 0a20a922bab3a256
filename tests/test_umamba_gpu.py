"""GPU: real nnU-Net training steps of every U-Mamba trainer with the mamba_ssm backend (fp16 AMP + GradScaler
for the default trainers, fp32 for NoAMP): finite loss, finite gradients, parameters updated."""
import numpy as np
import pytest
import torch

from nnunetv2_mamba.ssm import get_backend
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
    # With AMP the GradScaler may skip an early step on overflow (inf/NaN scaled gradients) and back off;
    # such steps are detected by the scale dropping. Every other step must have finite gradients, and the
    # loss (fp32 mixers) must always be finite.
    applied = 0
    for step in range(4):
        scale_before = trainer.grad_scaler.get_scale() if uses_amp else None
        result = trainer.train_step(make_batch(trainer, seed=step))
        assert np.isfinite(result["loss"]), f"step {step}: loss {result['loss']}"
        if uses_amp and trainer.grad_scaler.get_scale() < scale_before:
            continue
        applied += 1
        for name, p in trainer.network.named_parameters():
            if p.grad is not None:
                assert not torch.isnan(p.grad).any(), f"step {step}: NaN gradient in {name}"
                assert torch.isfinite(p.grad).all(), f"step {step}: non-finite gradient in {name}"
    assert applied >= 2, f"only {applied} of 4 steps were applied (GradScaler skipped the others)"
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    changed = [name for name, p in trainer.network.named_parameters() if not torch.equal(p, before[name])]
    assert any(".mamba." in name for name in changed)
    trainer.network.eval()
    assert np.isfinite(trainer.validation_step(make_batch(trainer, seed=9))["loss"])
