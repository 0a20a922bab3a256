"""Every network's Mamba mixer under autocast with extreme activations: finite outputs and gradients.

The mixers run in fp32 with autocast off (``run_in_fp32``, ARCHITECTURES.md §0.6); these inputs are the ones
that overflow fp16 Mamba (U-Mamba issues #8, #37): tokens scaled by 100 and maps of near-zero variance.
CPU: bf16 autocast; the GPU copy of the test uses fp16 autocast on CUDA.
"""
import pytest
import torch

from nnunetv2_mamba.network_architectures.logvmamba_geometry import make_stage_spec
from nnunetv2_mamba.network_architectures.logvmamba_mixers import LoGMambaLayer
from nnunetv2_mamba.network_architectures.taming import MambaLayer, MambaTrans, MultiMambaTrans, pan_mamba_trans
from nnunetv2_mamba.network_architectures.umamba import UMambaLayer
from nnunetv2_mamba.network_architectures.vivim import TemporalMambaLayer

CHANNELS = 16
MAP = (4, 4, 4)

MIXERS = {
    "umamba_patch_tokens": lambda: UMambaLayer(CHANNELS),
    "umamba_channel_tokens": lambda: UMambaLayer(64, channel_token=True),
    "taming_segmamba": lambda: MambaLayer(CHANNELS, MambaTrans(CHANNELS)),
    "taming_bisegmamba": lambda: MambaLayer(CHANNELS, pan_mamba_trans(CHANNELS)),
    "taming_multisegmamba": lambda: MultiMambaTrans(CHANNELS),
    "taming_multisegmamba_fp32": lambda: MultiMambaTrans(CHANNELS, mixer_fp32=True),
    "logvmamba_L": lambda: LoGMambaLayer(make_stage_spec(0, "L", CHANNELS, MAP, 3), 3),
    "logvmamba_LoG": lambda: LoGMambaLayer(make_stage_spec(0, "LoG", CHANNELS, MAP, 3), 3),
    "logvmamba_G": lambda: LoGMambaLayer(make_stage_spec(0, "G", CHANNELS, MAP, 3), 3),
    "vivim_alternating": lambda: TemporalMambaLayer(CHANNELS, reverse_frames=True),
    "vivim_st_v3": lambda: TemporalMambaLayer(CHANNELS, mixer="st_v3"),
}


def _extreme_inputs(generator):
    """Return {name: (1, C, 4, 4, 4) map}: x100 tokens, near-constant maps, one huge token among small ones."""
    shape = (1, CHANNELS, *MAP)
    normal = torch.randn(shape, generator=generator)
    one_huge = normal.clone()
    one_huge[..., 0, 0, 0] *= 1000.0
    return {"x100_tokens": normal * 100.0,
            "near_zero_variance": 3.0 + 1e-6 * normal,
            "all_zero": torch.zeros(shape),
            "one_token_x1000": one_huge}


def _check_finite_under_autocast(name, device, dtype):
    torch.manual_seed(0)
    mixer = MIXERS[name]().to(device)
    generator = torch.Generator().manual_seed(0)
    for kind, x in _extreme_inputs(generator).items():
        mixer.zero_grad(set_to_none=True)
        # Under autocast the mixer receives the previous convolution's low-precision output.
        x = x.to(device=device, dtype=dtype).requires_grad_(True)
        with torch.autocast(device_type=device, dtype=dtype):
            out = mixer(x)
            loss = out.float().square().mean()
        loss.backward()
        assert out.shape == x.shape, (name, kind)
        assert torch.isfinite(out).all(), f"{name}: non-finite output for {kind}"
        assert torch.isfinite(x.grad).all(), f"{name}: non-finite input gradient for {kind}"
        bad = [n for n, p in mixer.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert bad == [], f"{name}: non-finite gradients of {bad} for {kind}"
        assert x.grad is not None and any(p.grad is not None for p in mixer.parameters()), (name, kind)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixers_are_finite_under_cpu_bf16_autocast(name):
    _check_finite_under_autocast(name, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixers_are_finite_under_cuda_fp16_autocast(name):
    _check_finite_under_autocast(name, "cuda", torch.float16)


def test_mixer_dtype_policy_choices(monkeypatch):
    from nnunetv2_mamba.layers.precision import mixer_dtype
    monkeypatch.delenv("NNUNETV2_MAMBA_MIXER_DTYPE", raising=False)
    assert mixer_dtype("cpu", True) is torch.float32  # nnU-Net never autocasts on the CPU
    assert mixer_dtype("cuda", False) is torch.float32  # NoAMP: no autocast around the mixer
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "bf16")
    assert mixer_dtype("cuda", True) is torch.bfloat16
    assert mixer_dtype("cuda", False) is torch.float32
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "fp32")
    assert mixer_dtype("cuda", True) is torch.float32
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "half")
    with pytest.raises(ValueError, match=r"NNUNETV2_MAMBA_MIXER_DTYPE='half' is not a mixer precision; use one of auto"):
        mixer_dtype("cuda", True)


def test_cpu_autocast_keeps_the_mixer_in_fp32(monkeypatch):
    monkeypatch.delenv("NNUNETV2_MAMBA_MIXER_DTYPE", raising=False)
    layer = UMambaLayer(CHANNELS)
    seen = []
    layer.mamba.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(1, CHANNELS, *MAP, dtype=torch.bfloat16))
    assert seen == [torch.float32] and out.dtype is torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("policy, expected", [("auto", torch.bfloat16), ("fp32", torch.float32)])
def test_cuda_fp16_autocast_runs_the_mixer_in_the_policy_dtype(monkeypatch, policy, expected):
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", policy)
    layer = UMambaLayer(CHANNELS).cuda()
    seen = []
    # The Mamba layer's output is out_proj's: computed in the autocast dtype, or fp32 with autocast off (the
    # fused mamba_ssm path uses the projection weights directly, so a hook on in_proj would not fire).
    layer.mamba.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    x = torch.randn(2, CHANNELS, *MAP, device="cuda", dtype=torch.float16, requires_grad=True)
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        out = layer(x)
    out.float().square().mean().backward()
    assert seen == [expected]
    assert torch.isfinite(x.grad).all()
    reference = UMambaLayer(CHANNELS).cuda()
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        exact = reference(x.detach().float())
    # bf16 projections: the result stays within bf16 rounding of the fp32 mixer.
    assert torch.allclose(out.float(), exact, atol=5e-2, rtol=5e-2)
