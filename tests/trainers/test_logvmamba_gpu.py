"""GPU: LoG-VMamba with the mamba_ssm backend: real nnU-Net training steps under fp16 AMP (no NaN), agreement
of the mamba_ssm and torch backends on every mixer form, and the full 128^3 plan of the worked example."""
import pytest
import torch

from nnunetv2_mamba.network_architectures.logvmamba import build_logvmamba
from nnunetv2_mamba.network_architectures.logvmamba_mixers import (LocalGlobalTokenMixer, LocalTokenMixer,
                                                                   GlobalTokenMixer, VanillaScanMixer)
from nnunetv2_mamba.plans import NetworkPlan
from nnunetv2_mamba.ssm import get_backend
from nnunetv2_mamba.trainers.logvmamba import (nnUNetTrainerGVMamba, nnUNetTrainerLoGVMamba,
                                               nnUNetTrainerLoGVMambaPaperRecipe, nnUNetTrainerLVMamba)
from tests.amp_training import check_real_training_steps
from tests.network_architectures.test_logvmamba import arch_kwargs, benchmark_arch
from tests.builders import make_batch, make_trainer
from tests.trainers.test_logvmamba import DATASET_JSON, make_plans

pytestmark = pytest.mark.gpu

requires_mamba_ssm = pytest.mark.skipif(not get_backend("mamba_ssm").available(),
                                        reason="mamba_ssm is not installed")

# A GPU-sized plan with every role: pool 2 -> 32^3 L, 16^3 LoG (t=2), 8^3 G (q 2), 4^3 G (q 8).
GPU_PLANS = {
    "3d_gpu_5stages": (arch_kwargs([32, 64, 128, 256, 320], [[1, 1, 1]] + [[2, 2, 2]] * 4, blocks=[2] * 5,
                                   decoder_blocks=[2] * 4), (64, 64, 64)),
    # 2D: 128^2 L, 64^2 LoG (t=2), 32^2 / 16^2 / 8^2 G.
    "2d_gpu_6stages": (arch_kwargs([32, 64, 128, 256, 512, 512], [[1, 1]] + [[2, 2]] * 5, blocks=[2] * 6,
                                   decoder_blocks=[2] * 5), (256, 256)),
}


@requires_mamba_ssm
@pytest.mark.parametrize("plan_name,configuration", [("3d_gpu_5stages", "3d_fullres"), ("2d_gpu_6stages", "2d")])
@pytest.mark.parametrize("trainer_class", [nnUNetTrainerLoGVMamba, nnUNetTrainerLVMamba, nnUNetTrainerGVMamba,
                                           nnUNetTrainerLoGVMambaPaperRecipe], ids=lambda cls: cls.__name__)
def test_training_steps_with_mamba_ssm_backend(trainer_class, plan_name, configuration, tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "mamba_ssm")  # forced: fails instead of falling back
    torch.manual_seed(0)
    trainer = make_trainer(trainer_class, make_plans(GPU_PLANS[plan_name], configuration), configuration, DATASET_JSON,
                           tmp_path, monkeypatch, device="cuda")
    uses_amp = trainer_class is not nnUNetTrainerLoGVMambaPaperRecipe
    assert (trainer.grad_scaler is not None) == uses_amp
    # Early GradScaler skips are allowed (see tests/amp_training.py); steps must then be applied.
    check_real_training_steps(trainer, make_batch, ".self_attention.")


@requires_mamba_ssm
@pytest.mark.parametrize("make_mixer", [
    lambda backend: VanillaScanMixer(32, (8, 16, 16), backend=backend),
    lambda backend: LocalTokenMixer(32, (8, 16, 16), backend=backend),
    lambda backend: GlobalTokenMixer(64, (8, 16, 16), squeeze=2, backend=backend),
    lambda backend: LocalGlobalTokenMixer(64, (8, 16, 16), backend=backend)],
    ids=["SS3D", "LTX", "GTX", "LoG"])
def test_mamba_ssm_and_torch_backends_agree(make_mixer):
    torch.manual_seed(0)
    reference = make_mixer("torch").cuda()
    candidate = make_mixer("mamba_ssm").cuda()
    candidate.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 16, 16, reference.d_model, device="cuda", requires_grad=True)
    outputs, grads = [], []
    for mixer in (reference, candidate):
        x.grad = None
        out = mixer(x)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(x.grad.detach().clone())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-3, atol=1e-5)


@requires_mamba_ssm
def test_worked_example_128_plan_amp_steps(monkeypatch):
    """The benchmark network (128^3, batch 2, fp16 AMP + GradScaler, nnU-Net's SGD and gradient clipping): steps
    get applied with finite gradients and the loss stays finite.

    The first loss is large (about 50: faithful init, see tests/amp_training.py), so the scaler may skip a few
    steps while it backs off; at most 12 steps may pass before 2 are applied.
    """
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "mamba_ssm")
    torch.manual_seed(0)
    plan = NetworkPlan.from_arch_kwargs(benchmark_arch(), (128, 128, 128), 4, 3)
    network = build_logvmamba(plan).cuda().train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    data = torch.randn(2, 4, 128, 128, 128, device="cuda")
    target = torch.randint(0, 3, (2, 128, 128, 128), device="cuda")
    applied, history = 0, []
    for step in range(12):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            output = network(data)
            loss = torch.nn.functional.cross_entropy(output.float(), target)
        assert output.shape == (2, 3, 128, 128, 128)
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in network.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        finite = all(torch.isfinite(g).all() for g in grads)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)  # as nnU-Net's train_step
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        history.append((round(loss.item(), 3), scale_before, finite))
        assert finite == (scaler.get_scale() >= scale_before), "the scaler must skip exactly the non-finite steps"
        applied += finite
        if applied == 2:
            break
    assert applied == 2, f"GradScaler never settled: (loss, scale, finite) {history}"
