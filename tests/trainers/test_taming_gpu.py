"""GPU: real nnU-Net training steps of the four Taming trainers with the mamba_ssm backend under fp16 AMP
(GradScaler), plus a MultiSegMamba step with its mixers under autocast at a realistic resolution."""
import pytest
import torch

from nnunetv2_mamba.network_architectures.taming import build_taming_network
from nnunetv2_mamba.plans import NetworkPlan
from nnunetv2_mamba.ssm import get_backend
from nnunetv2_mamba.trainers import taming
from tests.amp_training import check_real_training_steps
from tests.builders import make_batch, make_trainer
from tests.trainers.test_taming import DATASET_JSON, make_plans

pytestmark = pytest.mark.gpu

requires_mamba_ssm = pytest.mark.skipif(not get_backend("mamba_ssm").available(),
                                        reason="mamba_ssm is not installed")


@requires_mamba_ssm
@pytest.mark.parametrize("trainer_name,configuration", [
    ("nnUNetTrainerSegMamba", "3d_fullres"), ("nnUNetTrainerBiSegMamba", "3d_fullres"),
    ("nnUNetTrainerMultiSegMamba", "3d_fullres"), ("nnUNetTrainerSegMambaSkip", "3d_fullres"),
    ("nnUNetTrainerSegMamba", "2d"), ("nnUNetTrainerMultiSegMambaNNUNetRecipe", "3d_fullres")])
def test_fp16_amp_training_steps_with_mamba_ssm_backend(trainer_name, configuration, tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "mamba_ssm")  # forced: fails instead of falling back
    torch.manual_seed(0)
    plans = make_plans(patch_3d=(32, 64, 64), features_3d=(16, 32, 64, 128))
    trainer = make_trainer(getattr(taming, trainer_name), plans, configuration, DATASET_JSON, tmp_path, monkeypatch,
                           device="cuda")
    assert trainer.grad_scaler is not None, "the reference recipe trains with fp16 AMP"
    # Early GradScaler skips are allowed (see tests/amp_training.py); steps must then be applied.
    check_real_training_steps(trainer, make_batch, ".mamba.")


@requires_mamba_ssm
@pytest.mark.parametrize("network_name", ["SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip"])
def test_torch_and_mamba_ssm_backends_give_the_same_network_output(network_name, monkeypatch):
    plans = make_plans(patch_3d=(16, 32, 32), features_3d=(8, 16, 32, 64))
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    plan = NetworkPlan.from_arch_kwargs(arch, (16, 32, 32), 1, 3)
    torch.manual_seed(0)
    network = build_taming_network(network_name, plan, False).cuda().eval()
    x = torch.randn(1, 1, 16, 32, 32, device="cuda")
    outputs = {}
    for backend in ("torch", "mamba_ssm"):
        monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", backend)
        with torch.no_grad():
            outputs[backend] = network(x)
    torch.testing.assert_close(outputs["mamba_ssm"], outputs["torch"], rtol=2e-3, atol=2e-3)
