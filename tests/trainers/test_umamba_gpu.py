"""GPU: real nnU-Net training steps of every U-Mamba trainer with the mamba_ssm backend (fp16 AMP + GradScaler
for the default trainers, fp32 for NoAMP): finite loss, finite gradients, parameters updated."""
import pytest
import torch

from nnunetv2_mamba.ssm import get_backend
from nnunetv2_mamba.trainers.base import NoAMPMixin
from nnunetv2_mamba.trainers.umamba import (nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP,
                                            nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaEncNoAMP)
from tests.amp_training import check_real_training_steps
from tests.builders import make_batch, make_trainer
from tests.trainers.test_umamba import DATASET_JSON, make_plans

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
    trainer = make_trainer(trainer_class, make_plans(), configuration, DATASET_JSON, tmp_path, monkeypatch,
                           device="cuda")
    uses_amp = not issubclass(trainer_class, NoAMPMixin)
    assert (trainer.grad_scaler is not None) == uses_amp
    # Early GradScaler skips are allowed (see tests/amp_training.py); steps must then be applied.
    check_real_training_steps(trainer, make_batch, ".mamba.")
