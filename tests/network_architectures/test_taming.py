"""Taming Mambas networks (SegMamba, BiSegMamba, MultiSegMamba, SegMambaSkip) on tiny CPU plans.

Shapes, deep supervision, backward without unused parameters, wiring, mixer formulas (recomputed here from the
spec with explicit tensor operations), dtype policy, state-dict round trip, plan immutability, clear errors.
"""
import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_mamba.network_architectures.taming import (
    BiSegMamba, MambaLayer, MambaTrans, MultiMambaTrans, MultiSegMamba, SegMamba, TAMING_NETWORKS,
    build_taming_network)
from nnunetv2_mamba.plans import NetworkPlan, PlanError
from tests.builders import arch_kwargs, configuration_manager

PLANS = {
    "2d_3stages": (arch_kwargs([4, 8, 8], [[1, 1], [2, 2], [2, 2]]), (16, 12)),
    "2d_6stages": (arch_kwargs([2, 4, 4, 8, 8, 8], [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 1]],
                               blocks=[1, 2, 1, 1, 1, 1], decoder_blocks=[1, 1, 2, 1, 1]), (64, 32)),
    "3d_3stages": (arch_kwargs([4, 8, 8], [[1, 1, 1], [2, 2, 2], [2, 2, 2]]), (8, 8, 8)),
    "3d_aniso_4stages": (arch_kwargs([4, 6, 8, 8], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                                     kernels=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]), (4, 16, 24)),
    "3d_resenc_5stages": (arch_kwargs([2, 4, 4, 4, 4], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 1]],
                                      blocks=[1, 2, 1, 1, 1], blocks_key="n_blocks_per_stage"), (8, 16, 16)),
}
NETWORK_NAMES = ["SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip"]


def make_plan(plan_name, input_channels=2, num_classes=3):
    arch, patch = PLANS[plan_name]
    return NetworkPlan.from_arch_kwargs(arch, patch, input_channels, num_classes)


def cases():
    for plan_name, (_, patch) in PLANS.items():
        for network_name in NETWORK_NAMES:
            if network_name == "MultiSegMamba" and len(patch) == 2:
                continue
            yield pytest.param(network_name, plan_name, id=f"{network_name}-{plan_name}")


@pytest.mark.parametrize("network_name,plan_name", list(cases()))
def test_shapes_backward_and_deep_supervision(network_name, plan_name):
    torch.manual_seed(0)
    plan = make_plan(plan_name)
    network = build_taming_network(network_name, plan, deep_supervision=True)
    x = torch.randn(2, plan.input_channels, *plan.patch_size)

    outputs = network(x)
    # Deep supervision: n-1 logit maps, highest resolution first, sizes patch // cumulative stride.
    cumulative = np.cumprod(np.array(plan.strides), axis=0)
    assert isinstance(outputs, (list, tuple)) and len(outputs) == plan.n_stages - 1
    for level, output in enumerate(outputs):
        expected = tuple(int(p // c) for p, c in zip(plan.patch_size, cumulative[level]))
        assert tuple(output.shape) == (2, plan.num_classes, *expected)
        assert torch.isfinite(output).all()

    # One DS step with every output weighted: no trainable parameter may be left without a gradient.
    sum(output.float().square().mean() for output in outputs).backward()
    missing = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in network.parameters())

    # DS off (what nnU-Net's predictor sets): one full-size map, equal to the highest-resolution DS output.
    network.decoder.deep_supervision = False
    with torch.no_grad():
        single = network(x)
    assert isinstance(single, torch.Tensor)
    assert tuple(single.shape) == (2, plan.num_classes, *plan.patch_size)
    torch.testing.assert_close(single, outputs[0].detach())


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_state_dict_round_trip_and_same_keys_with_and_without_deep_supervision(network_name):
    plan = make_plan("3d_aniso_4stages")
    torch.manual_seed(1)
    trained = build_taming_network(network_name, plan, deep_supervision=True)
    with torch.no_grad():  # move away from the initialisation (zeroed norms) so the check is not trivial
        for parameter in trained.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(2)
    restored = build_taming_network(network_name, plan, deep_supervision=False)
    assert set(restored.state_dict()) == set(trained.state_dict())
    restored.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(1, plan.input_channels, *plan.patch_size)
    trained.decoder.deep_supervision = False
    with torch.no_grad():
        torch.testing.assert_close(restored(x), trained(x))


def test_module_names_follow_the_reference():
    plan = make_plan("3d_3stages")
    names = {network: dict(build_taming_network(network, plan, True).named_modules()) for network in NETWORK_NAMES}
    for network, modules in names.items():
        for name in ("encoder.stem.convs.0", "encoder.stages.2.blocks.0", "decoder.transpconvs.1",
                     "decoder.stages.1.blocks.0", "decoder.seg_layers.1"):
            assert name in modules, f"{network}: missing {name}"
    assert isinstance(names["SegMamba"]["encoder.mamba_layers.0.mamba"], MambaTrans)
    assert isinstance(names["SegMamba"]["encoder.mamba_layers.0.norm"], nn.LayerNorm)
    for network in ("BiSegMamba", "SegMambaSkip"):
        for part in ("fwd_mamba", "bwd_mamba"):
            assert isinstance(names[network][f"encoder.mamba_layers.1.mamba.{part}"], MambaTrans)
        assert isinstance(names[network]["encoder.mamba_layers.1.mamba.norm"], nn.LayerNorm)
    multi = names["MultiSegMamba"]
    assert isinstance(multi["encoder.mamba_layers.0"], MultiMambaTrans)
    assert "encoder.mamba_layers.0.norm" not in multi  # no outer LayerNorm in MultiSegMamba
    assert len(multi["encoder.mamba_layers.0"].mambas) == 4
    assert isinstance(multi["encoder.mamba_layers.0.mambas.3.bwd_mamba"], MambaTrans)


def test_mamba_sizes_follow_the_spec():
    # d_state = min(C, 256) (Seg/Bi/Skip) or min(C, 64) (Multi); d_inner = 2C; dt_rank = ceil(C / 16).
    plan = NetworkPlan.from_arch_kwargs(arch_kwargs([8, 80], [[1, 1, 1], [2, 2, 2]]), (4, 4, 4), 1, 2)
    segmamba = build_taming_network("SegMamba", plan, True)
    multi = build_taming_network("MultiSegMamba", plan, True)
    for stage, channels in enumerate((8, 80)):
        mamba = segmamba.encoder.mamba_layers[stage].mamba.mamba
        assert (mamba.d_model, mamba.d_state, mamba.d_inner, mamba.dt_rank) == (channels, channels, 2 * channels,
                                                                                math.ceil(channels / 16))
        assert mamba.d_conv == 4
        for pan in multi.encoder.mamba_layers[stage].mambas:
            assert pan.fwd_mamba.mamba.d_state == min(channels, 64)
    wide = MambaTrans(300)
    assert wide.mamba.d_state == 256


def test_initialisation_is_he_with_zeroed_last_norms():
    plan = make_plan("3d_3stages")
    network = build_taming_network("BiSegMamba", plan, True)
    for module in network.modules():
        if type(module).__name__ == "BasicBlockD":
            assert torch.count_nonzero(module.conv2.norm.weight) == 0
            assert torch.count_nonzero(module.conv2.norm.bias) == 0
    for module in network.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
    # The Mamba's own initialisation is untouched (dt_proj.bias = softplus^-1(dt) with dt in [1e-3, 1e-1]).
    dt_bias = network.encoder.mamba_layers[0].mamba.fwd_mamba.mamba.dt_proj.bias
    dt = torch.nn.functional.softplus(dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


# --- mixers, recomputed from the spec formulas -------------------------------------------------------------
def _tokens(x):
    """(B, C, *S) -> (B, L, C), first spatial axis slowest (written out independently of the core helpers)."""
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)


def _untokens(t, shape):
    return t.permute(0, 2, 1).reshape(shape)


def test_segmamba_layer_matches_formula():
    torch.manual_seed(3)
    channels = 6
    mixer = MambaLayer(channels, MambaTrans(channels))
    x = torch.randn(2, channels, 3, 4, 5)
    with torch.no_grad():
        for p in mixer.parameters():  # non-trivial norms
            p.add_(0.1 * torch.randn_like(p))
        out = mixer(x)
        h = mixer.norm(_tokens(x))
        trans = mixer.mamba
        h = h + trans.mamba(trans.norm1(h))
        h = h + trans.head(trans.norm2(h))
    torch.testing.assert_close(out, _untokens(h, x.shape))


def test_bidirectional_layer_matches_formula():
    torch.manual_seed(4)
    network = BiSegMamba(1, 2, [5, 6], nn.Conv2d, [[3, 3]] * 2, [[1, 1], [2, 2]], [1, 1], 2, [1],
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    layer = network.encoder.mamba_layers[0]
    x = torch.randn(2, 5, 4, 6)
    with torch.no_grad():
        out = layer(x)
        h = layer.norm(_tokens(x))
        fwd = layer.mamba.fwd_mamba(h)
        bwd = layer.mamba.bwd_mamba(h.flip(1)).flip(1)
        expected = layer.mamba.norm(fwd + bwd)
    torch.testing.assert_close(out, _untokens(expected, x.shape))


def test_multi_axis_mixer_is_mean_over_four_axis_orders():
    torch.manual_seed(5)
    channels = 4
    mixer = MultiMambaTrans(channels)
    x = torch.randn(1, channels, 2, 3, 5)  # distinct sizes so that a wrong permutation cannot pass
    assert [tuple(o) for o in mixer.axis_orders] == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 0, 1)]
    with torch.no_grad():
        out = mixer(x)
        expected = torch.zeros_like(x)
        for pan, order in zip(mixer.mambas, [(2, 3, 4), (2, 4, 3), (3, 2, 4), (4, 2, 3)]):
            permuted = x.permute(0, 1, *order).contiguous()
            h = _tokens(permuted)
            mixed = pan.norm(pan.fwd_mamba(h) + pan.bwd_mamba(h.flip(1)).flip(1))
            back = _untokens(mixed, permuted.shape)
            inverse = [0, 1] + [order.index(axis) + 2 for axis in (2, 3, 4)]
            expected = expected + back.permute(*inverse)
        expected = expected / 4
    torch.testing.assert_close(out, expected)


def _record_inputs(modules):
    records = {}

    def hook(name):
        def record(module, inputs, output):
            records[name] = (inputs[0].detach().clone(), output.detach().clone())
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules]
    return records, handles


@pytest.mark.parametrize("network_name", ["SegMamba", "SegMambaSkip"])
def test_encoder_wiring_main_path_vs_skips(network_name):
    plan = make_plan("3d_3stages")
    network = build_taming_network(network_name, plan, deep_supervision=False)
    encoder = network.encoder
    modules = [(f"stage{s}", encoder.stages[s]) for s in range(3)] + \
              [(f"mixer{s}", encoder.mamba_layers[s]) for s in range(3)]
    records, handles = _record_inputs(modules)
    with torch.no_grad():
        skips = encoder(torch.randn(1, plan.input_channels, *plan.patch_size))
    for handle in handles:
        handle.remove()
    for s in range(3):
        torch.testing.assert_close(skips[s], records[f"mixer{s}"][1])  # every skip is mixer-processed
        torch.testing.assert_close(records[f"mixer{s}"][0], records[f"stage{s}"][1])
    for s in range(2):
        next_input = records[f"stage{s + 1}"][0]
        if network_name == "SegMambaSkip":  # main path continues with the conv features
            torch.testing.assert_close(next_input, records[f"stage{s}"][1])
        else:
            torch.testing.assert_close(next_input, records[f"mixer{s}"][1])


# --- dtype policy (§0.6) ------------------------------------------------------------------------------------
def _in_proj_dtypes(module):
    seen = []
    handles = [m.in_proj.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
               for m in module.modules() if hasattr(m, "in_proj")]
    return seen, handles


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16])
def test_segmamba_family_mixers_run_in_fp32_under_autocast(input_dtype):
    mixer = MambaLayer(4, MambaTrans(4))
    seen, handles = _in_proj_dtypes(mixer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(torch.randn(1, 4, 2, 3, 2).to(input_dtype))
    assert out.dtype == torch.float32
    assert seen and all(pair == (torch.float32, torch.float32) for pair in seen)


@pytest.mark.parametrize("mixer_fp32", [False, True])
def test_multisegmamba_mixer_follows_autocast_unless_fp32_flag(mixer_fp32):
    plan = make_plan("3d_3stages")
    network = build_taming_network("MultiSegMamba", plan, True, mixer_fp32=mixer_fp32)
    default = MultiSegMamba(1, 2, [4, 4], nn.Conv3d, [[3] * 3] * 2, [[1] * 3, [2] * 3], [1, 1], 2, [1])
    assert default.mixer_fp32 is False
    assert all(layer.mixer_fp32 is mixer_fp32 for layer in network.encoder.mamba_layers)
    seen, handles = _in_proj_dtypes(network.encoder.mamba_layers[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        network(torch.randn(1, plan.input_channels, *plan.patch_size))
    expected = torch.float32 if mixer_fp32 else torch.bfloat16
    assert len(seen) == 8 and all(out_dtype == expected for _, out_dtype in seen)


# --- plans: immutability and errors ------------------------------------------------------------------------
@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_building_leaves_the_plan_unchanged(network_name):
    arch, patch = PLANS["3d_aniso_4stages"]
    arch = copy.deepcopy(arch)
    configuration = configuration_manager(arch, patch)
    before = copy.deepcopy(arch)
    plan = NetworkPlan.from_nnunet(None, configuration, 2, 3)
    plan_before = copy.deepcopy(plan)
    build_taming_network(network_name, plan, True)
    build_taming_network(network_name, plan, False)
    assert configuration.network_arch_init_kwargs == before
    assert plan == plan_before
    # Direct construction must not modify or alias the caller's lists either.
    lists = {"features_per_stage": [4, 6, 8, 8], "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
             "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], "n_blocks_per_stage": [1, 1, 1, 1],
             "n_conv_per_stage_decoder": [1, 1, 1]}
    snapshot = copy.deepcopy(lists)
    network = TAMING_NETWORKS[network_name](2, 4, conv_op=nn.Conv3d, num_classes=3, **lists)
    assert lists == snapshot
    assert network.encoder.strides is not lists["strides"] and network.encoder.strides == snapshot["strides"]


def test_multisegmamba_rejects_2d_with_a_clear_message():
    plan = make_plan("2d_3stages")
    with pytest.raises(PlanError, match=r"MultiSegMamba supports 3D.*2D.*3d_fullres"):
        build_taming_network("MultiSegMamba", plan, True)
    with pytest.raises(AssertionError, match=r"MultiSegMamba supports \(3,\)D networks; got Conv2d"):
        MultiSegMamba(1, 2, [4, 4], nn.Conv2d, [[3, 3]] * 2, [[1, 1], [2, 2]], [1, 1], 2, [1])


def test_bad_arguments_raise_clear_errors():
    # Plans are normalised and checked once, by NetworkPlan (test_plans.py has its messages); the constructors
    # take that normal form and only assert it.
    with pytest.raises(AssertionError, match=r"kernel_sizes needs one entry per stage \(3\)"):
        SegMamba(1, 3, [4, 4, 4], nn.Conv3d, [[3] * 3] * 2, [[1] * 3, [2] * 3, [2] * 3], [1] * 3, 2, [1, 1])
    with pytest.raises(AssertionError, match=r"n_conv_per_stage_decoder needs 1 entries"):
        SegMamba(1, 2, [4, 4], nn.Conv3d, [[3] * 3] * 2, [[1] * 3, [2] * 3], [1, 1], 2, [1, 1])
    with pytest.raises(ValueError, match="Only 1d 2d and 3d conv are supported"):
        SegMamba(1, 2, [4, 4], nn.Linear, [[3], [3]], [[1], [2]], [1, 1], 2, [1])
    with pytest.raises(PlanError, match=r"strides\[1\]=\[2, 2\] has 2 axes; the patch has 3"):
        NetworkPlan.from_arch_kwargs(arch_kwargs([4, 4], [[1, 1, 1], [2, 2]]), (4, 4, 4), 1, 2)
    one_stage = NetworkPlan.from_arch_kwargs(arch_kwargs([4], [[1, 1, 1]], decoder_blocks=[]), (4, 4, 4), 1, 2)
    with pytest.raises(PlanError, match=r"cannot build BiSegMamba: .*n_stages >= 2.*got 1"):
        build_taming_network("BiSegMamba", one_stage, True)
    with pytest.raises(ValueError, match="Unknown Taming network 'SegMambaX'"):
        build_taming_network("SegMambaX", make_plan("3d_3stages"), True)
    network = SegMamba(1, 2, [4, 4], nn.Conv3d, [[3] * 3] * 2, [[1] * 3, [2] * 3], [1, 1], 2, [1])
    with pytest.raises(ValueError, match=r"expects input \(B, 1, S, S, S\)"):
        network(torch.randn(1, 2, 4, 4, 4))
