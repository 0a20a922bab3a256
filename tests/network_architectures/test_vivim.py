"""Vivim network (ARCHITECTURES.md §4.2): shapes, gradients, state dicts, module layout, mixers, init, fp32 policy."""
import copy

import pytest
import torch

from nnunetv2_mamba.layers import Mamba, frame_deinterleave, frame_interleave, from_tokens, run_reversed, to_tokens
from nnunetv2_mamba.layers.tokens import reverse_frames, run_frames_reversed
from nnunetv2_mamba.network_architectures.vivim import (STMambaV3, TemporalMambaLayer, Vivim, build_vivim)
from nnunetv2_mamba.plans import PlanError

# Tiny MiT (4 stages, 1 layer each, small widths) so that CPU tests take well under a second per network.
TINY = dict(embed_dims=(8, 16, 24, 32), mit_depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), tmb_depths=(2, 2, 2, 2),
            decoder_dim=16)
MIXERS = ("alternating", "st_v3")


def tiny_vivim(nframes=2, mixer="alternating", input_channels=3, num_classes=2, **overrides):
    torch.manual_seed(0)
    return Vivim(input_channels, num_classes, nframes, mixer=mixer, **{**TINY, **overrides})


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("clip", [(1, 2, 32, 32), (2, 3, 64, 32), (1, 1, 32, 96)])
def test_output_shape_for_several_clip_sizes(mixer, clip):
    batch, nframes, height, width = clip
    network = tiny_vivim(nframes, mixer, input_channels=1, num_classes=3)
    out = network(torch.randn(batch, 1, nframes, height, width))
    assert out.shape == (batch, 3, nframes, height, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mixer", MIXERS)
def test_backward_reaches_every_parameter(mixer):
    network = tiny_vivim(2, mixer).train()
    out = network(torch.randn(1, 3, 2, 32, 32))
    out.square().mean().backward()
    missing = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # no unused parameters (DDP without find_unused_parameters)
    assert all(torch.isfinite(p.grad).all() for p in network.parameters())


@pytest.mark.parametrize("mixer", MIXERS)
def test_state_dict_round_trip(mixer):
    source = tiny_vivim(2, mixer).eval()
    torch.manual_seed(123)  # the copy starts from different weights
    target = Vivim(3, 2, 2, mixer=mixer, **TINY).eval()
    x = torch.randn(1, 3, 2, 32, 32)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(copy.deepcopy(source.state_dict()), strict=True)
    torch.testing.assert_close(target(x), source(x))


def test_every_frame_sees_the_other_frames():
    """The Temporal Mamba layers mix the clip: changing frame 0 changes the prediction of the last frame."""
    for mixer in MIXERS:
        network = tiny_vivim(3, mixer).eval()
        x = torch.randn(1, 3, 3, 32, 32)
        changed = x.clone()
        changed[:, :, 0] += 1.0
        assert not torch.allclose(network(x)[:, :, -1], network(changed)[:, :, -1])


def test_default_is_mit_b3_with_reference_module_names():
    network = Vivim(3, 2, 5)
    mit = network.encoder.downsample_layers
    assert [len(stage) for stage in mit.block] == [3, 4, 18, 3]  # 28 MiT layers
    assert [embed.proj.out_channels for embed in mit.patch_embeddings] == [64, 128, 320, 512]
    assert [embed.proj.kernel_size[0] for embed in mit.patch_embeddings] == [7, 3, 3, 3]
    assert [embed.proj.stride[0] for embed in mit.patch_embeddings] == [4, 2, 2, 2]
    assert [mit.block[i][0].attention.self.num_heads for i in range(4)] == [1, 2, 5, 8]
    assert not hasattr(mit.block[3][0].attention.self, "sr")  # sr ratio 1: no reduction conv
    assert mit.block[0][0].attention.self.sr.kernel_size == (8, 8)
    assert [len(stage) for stage in network.encoder.stages] == [2, 2, 2, 2]
    names = set(dict(network.named_parameters()))
    for key in ("encoder.stages.2.1.0.norm1.weight", "encoder.stages.2.1.0.mamba.in_proj.weight",
                "encoder.stages.2.1.0.mlp.fc1.weight", "encoder.stages.2.1.0.mlp.dwconv.dwconv.weight",
                "encoder.stages.2.1.0.mlp.fc2.bias", "encoder.stages.2.1.0.norm2.bias",
                "decoder.linear_c.3.proj.weight", "decoder.linear_fuse.weight", "decoder.batch_norm.weight",
                "out.weight", "encoder.downsample_layers.block.2.17.attention.output.dense.weight"):
        assert key in names, key
    assert "decoder.linear_fuse.bias" not in names
    assert not any("classifier" in name or name.startswith("encoder.downsample_layers.layer_norm")
                   for name in names)  # HF's unused classifier / per-stage final norms are not created
    assert network.decoder.linear_fuse.in_channels == 4 * 768 and network.decoder.deep_supervision is False
    # Stochastic depth grows linearly to 0.1 over the 28 layers.
    assert mit.block[0][0].drop_path.__class__.__name__ == "Identity"
    assert mit.block[3][2].drop_path.drop_prob == pytest.approx(0.1)
    layer = network.encoder.stages[0][0][0]
    assert (layer.mamba.d_model, layer.mamba.d_state, layer.mamba.d_inner, layer.mamba.dt_rank) == (64, 16, 128, 4)
    assert network.encoder.stages[3][0][0].mamba.dt_rank == 32
    assert layer.mlp.fc1.out_features == 256 and layer.mlp.dwconv.dwconv.kernel_size == (3, 3, 3)


def test_alternating_layers_reverse_the_frame_order():
    network = tiny_vivim(2)
    flags = [[block[0].reverse_frames for block in stage] for stage in network.encoder.stages]
    assert flags == [[False, True]] * 4


def test_frame_reversal_keeps_the_order_inside_each_frame():
    nframes, height, width = 3, 2, 4
    clip = torch.arange(nframes * height * width, dtype=torch.float32).view(1, 1, nframes, height, width)
    tokens = to_tokens(clip)
    expected = to_tokens(clip.flip(2))  # frames T..1, C order inside each frame
    torch.testing.assert_close(reverse_frames(tokens, nframes), expected)
    torch.testing.assert_close(reverse_frames(reverse_frames(tokens, nframes), nframes), tokens)
    with pytest.raises(ValueError, match="multiple of the number of frames"):
        reverse_frames(tokens[:, :-1], nframes)


def test_reversed_layer_scans_frames_backwards():
    """A reversed TMB mixer equals the forward mixer run on the time-flipped clip, flipped back."""
    torch.manual_seed(0)
    mamba = Mamba(8)
    clip = torch.randn(2, 8, 3, 4, 4)
    reversed_out = run_frames_reversed(mamba, to_tokens(clip), 3)
    reference = from_tokens(mamba(to_tokens(clip.flip(2))), clip.shape[2:]).flip(2)
    torch.testing.assert_close(from_tokens(reversed_out, clip.shape[2:]), reference)


def test_st_mamba_v3_is_the_mean_of_three_directional_mambas():
    """out_proj is linear, so v3 = mean of three core Mambas (one per branch) in their token orders."""
    torch.manual_seed(0)
    mixer = STMambaV3(16)
    for parameter in mixer.parameters():  # non-trivial values everywhere, different per branch
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    branches = {}
    for suffix in STMambaV3.BRANCHES:
        mamba = Mamba(16)
        mamba.in_proj.load_state_dict(mixer.in_proj.state_dict())
        mamba.out_proj.load_state_dict(mixer.out_proj.state_dict())
        for name in ("conv1d", "x_proj", "dt_proj"):
            getattr(mamba, name).load_state_dict(getattr(mixer, f"{name}{suffix}").state_dict())
        mamba.A_log.data.copy_(getattr(mixer, f"A{suffix}_log"))
        mamba.D.data.copy_(getattr(mixer, f"D{suffix}"))
        branches[suffix] = mamba
    nframes = 3
    tokens = torch.randn(2, nframes * 6, 16)
    expected = (branches[""](tokens) + run_reversed(branches["_b"], tokens)
                + frame_deinterleave(branches["_s"](frame_interleave(tokens, nframes)), nframes)) / 3
    torch.testing.assert_close(mixer(tokens, nframes), expected, rtol=1e-4, atol=1e-5)


def test_st_mamba_v3_parameter_names():
    names = set(dict(STMambaV3(8).named_parameters()))
    for suffix in ("", "_b", "_s"):
        for stem in ("conv1d{}.weight", "conv1d{}.bias", "x_proj{}.weight", "dt_proj{}.weight", "dt_proj{}.bias",
                     "A{}_log", "D{}"):
            assert stem.format(suffix) in names
    assert {"in_proj.weight", "out_proj.weight"} <= names and "in_proj.bias" not in names


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    network = Vivim(3, 2, 2, **{**TINY, "embed_dims": (64, 64, 64, 64), "num_heads": (1, 1, 1, 1)})
    layer = network.encoder.stages[0][0][0]
    # TMB: every Linear (Mamba projections included) trunc-normal(0.02) with zero bias, so dt_proj.bias = 0.
    assert torch.count_nonzero(layer.mamba.dt_proj.bias) == 0 and torch.count_nonzero(layer.mlp.fc1.bias) == 0
    # (trunc_normal_ cuts at +-2 absolute, as timm's in the reference: in effect N(0, 0.02))
    assert layer.mamba.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.mamba.dt_proj.weight.std().item() == pytest.approx(0.02, rel=0.25)  # not Mamba's dt init
    torch.testing.assert_close(layer.mamba.A_log[0], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    # MiT and head: N(0, 0.02), zero bias.
    query = network.encoder.downsample_layers.block[0][0].attention.self.query
    assert query.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.count_nonzero(query.bias) == 0 and torch.count_nonzero(network.out.bias) == 0


def test_temporal_mamba_layer_runs_in_fp32_under_autocast():
    layer = TemporalMambaLayer(8)
    clip = torch.randn(1, 8, 2, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(clip)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(clip.float()))


def test_network_under_cpu_autocast_is_finite():
    network = tiny_vivim(2).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = network(torch.randn(1, 3, 2, 32, 32))
    assert torch.isfinite(out.float()).all()


def test_bad_input_is_reported_clearly():
    network = tiny_vivim(2)
    with pytest.raises(ValueError, match="clips of 2 frames"):
        network(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        network(torch.randn(1, 3, 2, 32, 40))
    with pytest.raises(ValueError, match="3 input channels"):
        network(torch.randn(1, 1, 2, 32, 32))
    with pytest.raises(ValueError, match="Unknown Vivim mixer"):
        Vivim(3, 2, 2, mixer="bidirectional")
    with pytest.raises(ValueError, match="one entry per stage"):
        Vivim(3, 2, 2, **{**TINY, "num_heads": (1, 2)})


def test_build_from_plan_uses_the_patch_frames_and_rejects_bad_plans():
    network = build_vivim((4, 64, 96), 3, 2, **TINY)
    assert network.nframes == 4 and network.num_classes == 2
    with pytest.raises(PlanError, match="2D"):
        build_vivim((64, 64), 3, 2, **TINY)
    with pytest.raises(PlanError, match=r"multiple of 32.*\[5, 48, 64\]"):
        build_vivim((5, 48, 64), 3, 2, **TINY)
    with pytest.raises(PlanError, match=r"nframes=5 differs .*\[4, 64, 96\]"):
        build_vivim((4, 64, 96), 3, 2, nframes=5, **TINY)
    with pytest.raises(PlanError, match=r"\['n_stages'\] are not arguments of Vivim"):
        build_vivim((4, 64, 96), 3, 2, n_stages=4, **TINY)
