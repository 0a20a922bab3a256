"""Vivim on a GPU: full MiT-B3 training step under fp16 AMP at the paper's clip size, backend agreement."""
import pytest
import torch

from nnunetv2_mamba.network_architectures.vivim import TemporalMambaLayer, Vivim

pytestmark = pytest.mark.gpu

MIXERS = ("alternating", "st_v3")


@pytest.mark.parametrize("mixer", MIXERS)
def test_amp_training_step_at_5x256x256(mixer):
    """nnU-Net-style step (fp16 autocast + GradScaler, clip 12) on two 5x256x256 clips: finite, all grads."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    network = Vivim(3, 2, 5, mixer=mixer).to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    clip = torch.randn(2, 3, 5, 256, 256, device=device)
    target = torch.randint(0, 2, (2, 5, 256, 256), device=device)
    losses = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = network(clip)
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert logits.shape == (2, 2, 5, 256, 256)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not [n for n, p in network.named_parameters() if p.grad is None]


def test_temporal_mamba_layers_stay_fp32_under_fp16_autocast():
    layer = TemporalMambaLayer(64, mixer="st_v3").cuda()
    clip = torch.randn(1, 64, 5, 16, 16, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        out = layer(clip)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("mixer", MIXERS)
def test_mamba_ssm_backend_matches_the_torch_backend(mixer):
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    tiny = dict(embed_dims=(32, 64, 96, 128), mit_depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), decoder_dim=64)
    reference = Vivim(3, 2, 5, mixer=mixer, backend="torch", **tiny).cuda().eval()
    fused = Vivim(3, 2, 5, mixer=mixer, backend="mamba_ssm", **tiny).cuda().eval()
    fused.load_state_dict(reference.state_dict())
    clip = torch.randn(1, 3, 5, 128, 128, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(clip), reference(clip), rtol=2e-3, atol=2e-3)
