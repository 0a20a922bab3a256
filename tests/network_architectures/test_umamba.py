"""U-Mamba networks (ARCHITECTURES.md §1): structure, block counts, channel tokens, parameter count, shapes, DS, dtypes."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnunetv2_mamba.network_architectures.blocks import BasicResBlock, UpsampleLayer, residual_stage
from nnunetv2_mamba.network_architectures.umamba import (UMambaBot, UMambaEnc, UMambaEncoder, UMambaLayer,
                                                         build_umamba_bot, build_umamba_enc, stage_feature_map_sizes,
                                                         umamba_block_counts)
from nnunetv2_mamba.plans import NetworkPlan, PlanError
from tests.builders import arch_kwargs

BUILDERS = {"enc": build_umamba_enc, "bot": build_umamba_bot}


def worked_example_plan(dim=3):
    """Return the §5 plan (3D 128^3, 6 stages; or its 2D analogue) - built only, never run on the CPU."""
    n = 6
    kwargs = arch_kwargs([32, 64, 128, 256, 320, 320], [[1] * dim] + [[2] * dim] * (n - 1), kernels=[[3] * dim] * n,
                         blocks=2, decoder_blocks=2)
    return NetworkPlan.from_arch_kwargs(kwargs, (128,) * dim, 4, 3)


# Tiny plans for running networks on 2 CPU cores: (name, arch_kwargs, patch size).
TINY_PLANS = [
    ("3d_aniso_4", arch_kwargs([4, 8, 12, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                               kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], blocks=2, decoder_blocks=2), (8,
                               16, 16)),
    ("3d_iso_3", arch_kwargs([4, 8, 8], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], kernels=[[3, 3, 3]] * 3, blocks=2,
                             decoder_blocks=2), (8, 8, 8)),
    ("3d_aniso_5", arch_kwargs([4, 6, 8, 8, 8], [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                               kernels=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], blocks=2,
                               decoder_blocks=2), (4, 32, 32)),
    ("2d_4", arch_kwargs([4, 8, 8, 16], [[1, 1], [2, 2], [2, 2], [2, 2]], kernels=[[3, 3]] * 4, blocks=2,
                         decoder_blocks=2), (16, 24)),
    ("2d_5", arch_kwargs([4, 4, 8, 8, 8], [[1, 1], [2, 1], [2, 2], [2, 2], [1, 2]], kernels=[[3, 3]] * 5, blocks=2,
                         decoder_blocks=2), (32, 16)),
]


def tiny_plan(name, input_channels=2, num_classes=3):
    """Return the NetworkPlan of a named tiny plan."""
    kwargs, patch = {p[0]: (p[1], p[2]) for p in TINY_PLANS}[name]
    return NetworkPlan.from_arch_kwargs(kwargs, patch, input_channels, num_classes)


def expected_ds_shapes(plan, batch):
    """Return the nnU-Net deep-supervision output shapes: patch // cumprod(strides)[:-1], full res first."""
    shapes, cumulative = [], np.ones(plan.dim, dtype=int)
    for stride in plan.strides[:-1]:
        cumulative = cumulative * np.array(stride)
        shapes.append((batch, plan.num_classes, *(np.array(plan.patch_size) // cumulative).tolist()))
    return shapes


# ------------------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,encoder,decoder", [
    # Values from ARCHITECTURES.md (§1.3 formula, §5 table for n = 6), not from the implementation.
    (6, [2, 2, 2, 1, 1, 1], [2, 2, 2, 1, 1]),
    (5, [2, 2, 2, 1, 1], [2, 2, 2, 1]),
    (4, [2, 2, 1, 1], [2, 2, 1]),
    (7, [2, 2, 2, 2, 1, 1, 1], [2, 2, 2, 2, 1, 1]),
    (2, [2, 1], [2]),
])
def test_block_count_override_returns_new_lists(n, encoder, decoder):
    nb, nd = [2] * n, [2] * (n - 1)
    got_encoder, got_decoder = umamba_block_counts(nb, nd)
    assert (got_encoder, got_decoder) == (encoder, decoder)
    assert nb == [2] * n and nd == [2] * (n - 1), "the caller's lists must not be modified"
    assert got_encoder is not nb and got_decoder is not nd


def test_block_count_override_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="needs 3"):
        umamba_block_counts([2] * 4, [2] * 4)


def test_worked_example_enc_mixers_match_spec_table():
    network = build_umamba_enc(worked_example_plan(), deep_supervision=True)
    # §5 table: (channel_token, d_model, d_inner, dt_rank) per stage.
    table = [(False, 32, 64, 2), (False, 64, 128, 4), (False, 128, 256, 8), (False, 256, 512, 16),
             (False, 320, 640, 20), (True, 64, 128, 4)]
    for stage, (channel_token, d_model, d_inner, dt_rank) in enumerate(table):
        layer = network.encoder.mamba_layers[stage]
        assert isinstance(layer, UMambaLayer)
        assert (layer.channel_token, layer.mamba.d_model, layer.mamba.d_inner, layer.mamba.dt_rank) == \
            (channel_token, d_model, d_inner, dt_rank), f"stage {stage}"
        assert type(layer.mamba.d_model) is int and layer.mamba.d_state == 16
        assert tuple(layer.norm.normalized_shape) == (d_model,)
    # Blocks after the override: encoder [2,2,2,1,1,1] (stem uses nb[0] = 2), decoder [2,2,2,1,1].
    assert len(network.encoder.stem) == 2
    assert [len(stage) for stage in network.encoder.stages] == [2, 2, 2, 1, 1, 1]
    assert [len(stage) for stage in network.decoder.stages] == [2, 2, 2, 1, 1]
    assert not hasattr(network, "mamba_layer")


def test_worked_example_bot_has_one_patch_token_bottleneck_mixer():
    network = build_umamba_bot(worked_example_plan(), deep_supervision=True)
    layer = network.mamba_layer
    assert (layer.channel_token, layer.mamba.d_model, layer.mamba.d_inner, layer.mamba.dt_rank) == \
        (False, 320, 640, 20)
    assert not hasattr(network.encoder, "mamba_layers")
    assert sum(isinstance(m, UMambaLayer) for m in network.modules()) == 1
    assert [len(stage) for stage in network.encoder.stages] == [2, 2, 2, 1, 1, 1]


@pytest.mark.parametrize("n,mixer_stages", [(7, [0, 2, 4, 6]), (8, [1, 3, 5, 7]), (6, [1, 3, 5]), (5, [0, 2, 4])])
def test_2d_enc_alternates_mixers_ending_at_the_last_stage(n, mixer_stages):
    kwargs = arch_kwargs([4] * n, [[1, 1]] + [[2, 2]] * (n - 1), kernels=[[3, 3]] * n, blocks=2, decoder_blocks=2)
    plan = NetworkPlan.from_arch_kwargs(kwargs, (2 ** (n - 1), 2 ** (n - 1)), 1, 2)
    network = build_umamba_enc(plan, deep_supervision=False)
    got = [s for s, layer in enumerate(network.encoder.mamba_layers) if isinstance(layer, UMambaLayer)]
    assert got == mixer_stages
    assert all(isinstance(layer, nn.Identity) for s, layer in enumerate(network.encoder.mamba_layers)
               if s not in mixer_stages)


def test_2d_last_decoder_stage_has_no_full_resolution_skip():
    plan = tiny_plan("2d_4")
    network = build_umamba_enc(plan, deep_supervision=False)
    features = plan.features_per_stage
    in_channels = [stage[0].conv1.in_channels for stage in network.decoder.stages]
    assert in_channels == [2 * features[2], 2 * features[1], features[0]]
    assert network.decoder.stages[-1][0].conv3 is not None, "the 1x1 shortcut still exists"
    network3d = build_umamba_enc(tiny_plan("3d_aniso_4"), deep_supervision=False)
    assert network3d.decoder.stages[-1][0].conv1.in_channels == 2 * 4


def test_channel_token_rule_uses_patch_and_cumulative_strides():
    # 2D, last stage 4x2 = 8 positions <= 16 channels -> channel tokens with d_model 8; others patch tokens.
    plan = tiny_plan("2d_5")  # patch (32, 16), strides (2,1),(2,2),(2,2),(1,2) -> maps 16x16, 8x8, 4x4, 4x2
    network = build_umamba_enc(plan, deep_supervision=False)
    mixers = network.encoder.mamba_layers
    assert isinstance(mixers[4], UMambaLayer) and mixers[4].channel_token and mixers[4].dim == 8
    assert isinstance(mixers[2], UMambaLayer) and not mixers[2].channel_token and mixers[2].dim == 8
    # The ACDC-like anisotropic plan of §5 has no channel-token stage (bottleneck 7*8*7 = 392 > 320).
    kwargs = arch_kwargs([32, 64, 128, 256, 320, 320],
                         [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
                         kernels=[[1, 3, 3]] + [[3, 3, 3]] * 5, blocks=2, decoder_blocks=2)
    acdc = build_umamba_enc(NetworkPlan.from_arch_kwargs(kwargs, (14, 256, 224), 1, 4), True)
    assert not any(layer.channel_token for layer in acdc.encoder.mamba_layers)


# ------------------------------------------------------------------------------------------------------------
# Parameter count, derived independently from the module list of ARCHITECTURES.md §0.4, §0.5, §1.3, §1.4
# ------------------------------------------------------------------------------------------------------------

def conv_params(cin, cout, kernel, bias):
    return cin * cout * int(np.prod(kernel)) + (cout if bias else 0)


def basic_res_block_params(cin, cout, kernel):
    # conv1 + IN + conv2 + IN (convs always biased) + 1x1 shortcut (biased)
    return (conv_params(cin, cout, kernel, True) + 2 * cout + conv_params(cout, cout, kernel, True) + 2 * cout
            + conv_params(cin, cout, [1], True))


def basic_block_d_params(channels, kernel, conv_bias):
    # two k-convs with the plan's bias, each followed by IN; identity skip (same channels, stride 1)
    return 2 * (conv_params(channels, channels, kernel, conv_bias) + 2 * channels)


def stage_params(cin, cout, kernel, n_blocks):
    return basic_res_block_params(cin, cout, kernel) + (n_blocks - 1) * basic_block_d_params(cout, kernel, True)


def mamba_layer_params(d, d_state=16, d_conv=4, expand=2):
    d_inner, rank = expand * d, math.ceil(d / 16)
    mamba = (d * 2 * d_inner  # in_proj
             + d_inner * d_conv + d_inner  # depthwise conv1d + bias
             + d_inner * (rank + 2 * d_state)  # x_proj
             + rank * d_inner + d_inner  # dt_proj
             + d_inner * d_state + d_inner  # A_log, D
             + d_inner * d)  # out_proj
    return 2 * d + mamba  # + LayerNorm


def expected_umamba_params(plan, variant):
    n, F, K = plan.n_stages, plan.features_per_stage, plan.kernel_sizes
    nb = [b if s < math.ceil(n / 2) else 1 for s, b in enumerate(plan.n_blocks_per_stage)]
    nd = [b if j < math.ceil((n - 1) / 2 + 0.5) else 1 for j, b in enumerate(plan.n_conv_per_stage_decoder)]
    total = stage_params(plan.input_channels, F[0], K[0], nb[0])
    previous = F[0]
    for s in range(n):
        total += stage_params(previous, F[s], K[s], nb[s])
        previous = F[s]
    sizes = stage_feature_map_sizes(plan.patch_size, plan.strides)
    if variant == "enc":
        for s in range(n):
            if plan.dim == 2 and (s % 2 == 1) == (n % 2 == 1):
                continue
            positions = int(np.prod(sizes[s]))
            total += mamba_layer_params(positions if positions <= F[s] else F[s])
    else:
        total += mamba_layer_params(F[-1])
    for j in range(n - 1):
        below, skip = n - 1 - j, n - 2 - j
        total += conv_params(F[below], F[skip], [1], True)  # upsample 1x1 conv
        stage_in = F[skip] if (plan.dim == 2 and j == n - 2) else 2 * F[skip]
        total += stage_params(stage_in, F[skip], K[skip], nd[j])
        total += conv_params(F[skip], plan.num_classes, [1], True)  # seg layer
    return total


@pytest.mark.parametrize("variant", ["enc", "bot"])
@pytest.mark.parametrize("plan_factory", [lambda: worked_example_plan(3), lambda: worked_example_plan(2),
                                          lambda: tiny_plan("3d_aniso_5"), lambda: tiny_plan("2d_5")],
                         ids=["3d_128", "2d_128", "3d_aniso_5", "2d_5"])
def test_parameter_count_matches_spec_module_list(variant, plan_factory):
    plan = plan_factory()
    network = BUILDERS[variant](plan, deep_supervision=True)
    assert sum(p.numel() for p in network.parameters()) == expected_umamba_params(plan, variant)


# ------------------------------------------------------------------------------------------------------------
# Forward / backward / deep supervision
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["enc", "bot"])
@pytest.mark.parametrize("plan_name", [p[0] for p in TINY_PLANS])
def test_forward_shapes_and_deep_supervision_toggle(variant, plan_name):
    torch.manual_seed(0)
    plan = tiny_plan(plan_name)
    network = BUILDERS[variant](plan, deep_supervision=True)
    x = torch.randn(2, plan.input_channels, *plan.patch_size)
    outputs = network(x)
    assert isinstance(outputs, list)
    assert [tuple(o.shape) for o in outputs] == expected_ds_shapes(plan, 2)
    assert all(torch.isfinite(o).all() for o in outputs)
    network.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled writes
    single = network(x)
    assert torch.is_tensor(single) and single.shape == (2, plan.num_classes, *plan.patch_size)
    torch.testing.assert_close(single, outputs[0])


@pytest.mark.parametrize("variant", ["enc", "bot"])
@pytest.mark.parametrize("plan_name", ["3d_aniso_4", "2d_5"])
def test_deep_supervision_step_leaves_no_parameter_without_grad(variant, plan_name):
    torch.manual_seed(0)
    plan = tiny_plan(plan_name)
    network = BUILDERS[variant](plan, deep_supervision=True)
    outputs = network(torch.randn(2, plan.input_channels, *plan.patch_size))
    loss = sum(weight * out.square().mean() for weight, out in zip([1.0, 0.5, 0.25, 0.125, 0.0625], outputs))
    loss.backward()
    missing = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in network.parameters())
    mixer_grads = [p.grad.abs().sum() for name, p in network.named_parameters() if "mamba" in name]
    assert mixer_grads and all(g > 0 for g in mixer_grads[:1])


@pytest.mark.parametrize("variant", ["enc", "bot"])
@pytest.mark.parametrize("plan_name", ["3d_aniso_4", "3d_iso_3"])
def test_channels_last_run_gives_the_same_outputs_and_gradients(variant, plan_name, monkeypatch):
    """$NNUNETV2_MAMBA_CHANNELS_LAST=1 runs the maps channels last (on the GPU the default for 3D): its logits and
    parameter gradients are as close to an fp64 run's as the contiguous fp32 run's are (the conv algorithms differ,
    so the rounding does), and the maps really are channels last inside."""
    from nnunetv2_mamba.layers.memory_format import CHANNELS_LAST_ENV_VAR

    torch.manual_seed(0)
    plan = tiny_plan(plan_name)
    network = BUILDERS[variant](plan, deep_supervision=True)
    x = torch.randn(2, plan.input_channels, *plan.patch_size)
    memory_format = torch.channels_last_3d if x.dim() == 5 else torch.channels_last

    def run(net, inputs):
        net.zero_grad()
        seen = []
        hook = net.encoder.stages[-1].register_forward_hook(lambda m, i, o: seen.append(o))
        outputs = net(inputs)
        hook.remove()
        sum(out.square().mean() for out in outputs).backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        return torch.cat([o.detach().flatten() for o in outputs]), grads, seen[0]

    monkeypatch.setenv(CHANNELS_LAST_ENV_VAR, "0")
    reference_out, reference_grads, _ = run(copy.deepcopy(network).double(), x.double())
    errors = {}
    for choice in ("0", "1"):
        monkeypatch.setenv(CHANNELS_LAST_ENV_VAR, choice)
        out, grads, inside = run(network, x)
        assert inside.is_contiguous(memory_format=memory_format) == (choice == "1") or inside[0, 0].numel() == 1
        errors[choice] = [((ours.double() - ref).norm() / ref.norm()).item()
                          for ours, ref in ((out, reference_out), (grads, reference_grads))]
    assert errors["0"][0] < 1e-4 and errors["0"][1] < 1e-2, errors  # fp32 rounding, amplified by tiny norms
    assert all(cl <= 3 * plain + 1e-6 for cl, plain in zip(errors["1"], errors["0"])), errors


def test_torch_cpu_conv2d_channels_last_weight_gradient_bug_keeps_2d_cpu_maps_contiguous(monkeypatch):
    """torch's CPU Conv2d gets the weight gradient of a strided 1x1 conv wrong on channels-last input (torch 2.14.1,
    about half of random trials), so even $NNUNETV2_MAMBA_CHANNELS_LAST=1 leaves 2D CPU maps contiguous."""
    from nnunetv2_mamba.layers.memory_format import CHANNELS_LAST_ENV_VAR, to_network_memory_format

    torch.manual_seed(0)
    wrong = 0
    for _ in range(20):
        conv = nn.Conv2d(4, 4, 1, stride=(2, 1))
        x, grad = torch.randn(2, 4, 10, 12), torch.randn(2, 4, 5, 12)
        reference = torch.autograd.grad(conv(x), conv.weight, grad)[0]
        channels_last = torch.autograd.grad(conv(x.contiguous(memory_format=torch.channels_last)), conv.weight,
                                            grad.contiguous(memory_format=torch.channels_last))[0]
        wrong += not torch.allclose(channels_last, reference, atol=1e-5)
    assert wrong > 0, "this torch computes the gradient right: 2D CPU maps may run channels last (lift the guard)"
    monkeypatch.setenv(CHANNELS_LAST_ENV_VAR, "1")
    assert to_network_memory_format(torch.zeros(1, 2, 4, 4)).is_contiguous()
    assert not to_network_memory_format(torch.zeros(1, 2, 4, 4, 4)).is_contiguous()


def test_channels_last_choice_is_validated(monkeypatch):
    from nnunetv2_mamba.layers.memory_format import CHANNELS_LAST_ENV_VAR, to_network_memory_format

    monkeypatch.setenv(CHANNELS_LAST_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="NNUNETV2_MAMBA_CHANNELS_LAST='yes' is not a choice"):
        to_network_memory_format(torch.zeros(1, 1, 2, 2, 2))
    monkeypatch.setenv(CHANNELS_LAST_ENV_VAR, "auto")  # auto: CPU maps stay as they are
    assert to_network_memory_format(torch.zeros(1, 2, 2, 2, 2)).is_contiguous()


@pytest.mark.parametrize("variant", ["enc", "bot"])
@pytest.mark.parametrize("plan_name", ["3d_aniso_4", "2d_4"])
def test_state_dict_keys_independent_of_ds_and_round_trip(variant, plan_name, tmp_path):
    plan = tiny_plan(plan_name)
    torch.manual_seed(0)
    with_ds = BUILDERS[variant](plan, deep_supervision=True)
    torch.manual_seed(1)
    without_ds = BUILDERS[variant](plan, deep_supervision=False)
    assert list(with_ds.state_dict().keys()) == list(without_ds.state_dict().keys())
    torch.save(with_ds.state_dict(), tmp_path / "weights.pth")
    without_ds.load_state_dict(torch.load(tmp_path / "weights.pth"))
    x = torch.randn(1, plan.input_channels, *plan.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(without_ds(x), with_ds(x)[0])


def test_reference_module_names():
    network = build_umamba_enc(tiny_plan("3d_aniso_4"), deep_supervision=True)
    keys = set(network.state_dict().keys())
    for key in ("encoder.stem.0.conv1.weight", "encoder.stem.0.conv3.weight", "encoder.stem.1.conv1.conv.weight",
                "encoder.stages.0.0.conv1.weight", "encoder.mamba_layers.0.norm.weight",
                "encoder.mamba_layers.0.mamba.A_log", "decoder.upsample_layers.0.conv.weight",
                "decoder.stages.0.0.conv1.weight", "decoder.seg_layers.0.weight"):
        assert key in keys, key
    bot = build_umamba_bot(tiny_plan("3d_aniso_4"), deep_supervision=True)
    assert "mamba_layer.mamba.in_proj.weight" in bot.state_dict()


def test_encoder_mixer_factory_is_injected_per_stage():
    calls = []

    def factory(stage, channels, size):
        calls.append((stage, channels, size))
        return nn.Conv3d(channels, channels, 1) if stage == 1 else nn.Identity()

    encoder = UMambaEncoder(1, 3, [4, 8, 8], nn.Conv3d, [[3, 3, 3]] * 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                            [1, 1, 1], norm_op=nn.InstanceNorm3d, nonlin=nn.ReLU, input_size=(8, 16, 16),
                            mixer_factory=factory, stem_pool=nn.Identity())
    assert calls == [(0, 4, (8, 16, 16)), (1, 8, (8, 8, 8)), (2, 8, (4, 4, 4))]
    skips, stem_output = encoder.forward_with_stem(torch.randn(1, 1, 8, 16, 16))
    assert [tuple(s.shape[1:]) for s in skips] == [(4, 8, 16, 16), (8, 8, 8, 8), (8, 4, 4, 4)]
    assert stem_output.shape == (1, 4, 8, 16, 16)
    assert "mamba_layers.1.weight" in encoder.state_dict()


# ------------------------------------------------------------------------------------------------------------
# Token orders and dtype policy of the mixer
# ------------------------------------------------------------------------------------------------------------

def test_patch_token_layer_is_causal_in_c_order():
    torch.manual_seed(0)
    layer = UMambaLayer(4)
    x = torch.randn(1, 4, 3, 4, 5)
    changed = x.clone()
    changed[0, :, 1, 2, 3] += 1.0  # flat C-order index 1*20 + 2*5 + 3 = 33
    with torch.no_grad():
        diff = (layer(changed) - layer(x)).abs().sum(1).flatten()
    assert diff[:33].max() == 0 and diff[33] > 0 and diff[34:].max() > 0


def test_channel_token_layer_scans_over_channels():
    torch.manual_seed(0)
    layer = UMambaLayer(8, channel_token=True)  # 2x4 map -> d_model 8; 6 channels are the tokens
    x = torch.randn(2, 6, 2, 4)
    changed = x.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        diff = (layer(changed) - layer(x)).abs().sum(dim=(0, 2, 3))
    assert diff[:3].max() == 0 and diff[3:].min() > 0
    with pytest.raises(ValueError, match="built for feature maps of 8 positions"):
        layer(torch.randn(1, 6, 4, 4))


@pytest.mark.parametrize("channel_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixer_runs_in_fp32_with_autocast_disabled(channel_token, dtype):
    torch.manual_seed(0)
    layer = UMambaLayer(12 if channel_token else 4, channel_token=channel_token)
    x = torch.randn(2, 4, 3, 4).to(dtype)
    with torch.no_grad():
        reference = layer(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = layer(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Plans are never modified; bad plans fail at construction with clear messages
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("network_class", [UMambaEnc, UMambaBot])
def test_constructor_leaves_argument_lists_unchanged(network_class):
    kwargs = arch_kwargs([4, 8, 8, 8], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernels=[[3, 3, 3]] * 4, blocks=2,
                         decoder_blocks=2)
    arguments = dict(input_channels=1, n_stages=4, features_per_stage=kwargs["features_per_stage"],
                     conv_op=nn.Conv3d, kernel_sizes=kwargs["kernel_sizes"], strides=kwargs["strides"],
                     n_blocks_per_stage=kwargs["n_conv_per_stage"], num_classes=2,
                     n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"], input_size=[16, 16, 16],
                     norm_op=nn.InstanceNorm3d, norm_op_kwargs=kwargs["norm_op_kwargs"], nonlin=nn.LeakyReLU,
                     nonlin_kwargs=kwargs["nonlin_kwargs"], deep_supervision=True)
    snapshot = copy.deepcopy(arguments)
    network_class(**arguments)
    network_class(**arguments)
    assert arguments == snapshot


@pytest.mark.parametrize("builder", [build_umamba_enc, build_umamba_bot])
def test_building_from_arch_kwargs_leaves_them_unchanged(builder):
    kwargs, patch = TINY_PLANS[0][1], TINY_PLANS[0][2]
    snapshot = copy.deepcopy(kwargs)
    plan = NetworkPlan.from_arch_kwargs(kwargs, patch, 1, 2)
    plan_snapshot = copy.deepcopy(plan)
    for _ in range(2):
        network = builder(plan, True)
    assert kwargs == snapshot and plan == plan_snapshot
    assert network.encoder.strides == plan.strides and network.encoder.strides is not plan.strides


@pytest.mark.parametrize("network_class,builder", [(UMambaEnc, build_umamba_enc), (UMambaBot, build_umamba_bot)])
def test_direct_construction_is_initialised_as_it_trains(network_class, builder):
    plan = tiny_plan("3d_aniso_4")
    torch.manual_seed(0)
    built = builder(plan, True)
    torch.manual_seed(0)
    direct = network_class(**plan.unet_kwargs(with_input_size=True), deep_supervision=True)
    for (name, expected), value in zip(built.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(value, expected), name
    # He init (nnU-Net's InitWeights_He(1e-2)): every conv bias is zero (PyTorch's default init is not).
    conv_biases = [m.bias for m in direct.modules() if isinstance(m, nn.Conv3d) and m.bias is not None]
    assert conv_biases and all(torch.count_nonzero(b) == 0 for b in conv_biases)


def test_input_the_network_cannot_take_gets_one_clear_error():
    # 3d_iso_3 on an 8^3 patch: the last encoder stage (2x2x2 map, 8 channels) uses channel tokens.
    enc, bot = build_umamba_enc(tiny_plan("3d_iso_3"), False), build_umamba_bot(tiny_plan("3d_iso_3"), False)
    assert enc.size_tied and enc.encoder.mamba_layers[2].channel_token
    with torch.no_grad():
        assert enc(torch.randn(1, 2, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
        # Patch tokens take any size divisible by the total stride; U-Mamba-Bot keeps doing so.
        assert bot(torch.randn(1, 2, 16, 8, 24)).shape == (1, 3, 16, 8, 24)
        # Same number of positions at the channel-token stage (1x4x2 = 8) must not silently run either.
        for shape in [(16, 16, 16), (4, 16, 8), (8, 8, 6)]:
            with pytest.raises(ValueError) as error:
                enc(torch.randn(1, 2, *shape))
            message = str(error.value)
            assert "\n" not in message
            assert "built for patch size [8, 8, 8]" in message and f"got an input of spatial size {list(shape)}" in message
            assert "feed patches of size [8, 8, 8]" in message
        # Not divisible by the total stride 4: a clear message instead of torch.cat's size mismatch.
        with pytest.raises(ValueError, match=r"U-Mamba-Bot needs an input whose spatial size is divisible by its "
                                             r"total stride \[4, 4, 4\]; got spatial size \[8, 8, 6\]"):
            bot(torch.randn(1, 2, 8, 8, 6))


def test_bad_inputs_raise_clear_errors():
    kwargs = arch_kwargs([4, 8, 8], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], kernels=[[3, 3, 3]] * 3, blocks=2,
                         decoder_blocks=2)
    with pytest.raises(PlanError, match=r"\[8, 8, 6\] is not divisible .*\[4, 4, 4\]"):
        build_umamba_enc(NetworkPlan.from_arch_kwargs(kwargs, (8, 8, 6), 1, 2), True)
    # Direct construction: arguments are expected in NetworkPlan's normal form and checked with asserts.
    with pytest.raises(AssertionError, match=r"input_size \[8, 8\] does not fit Conv3d"):
        UMambaEnc(1, 3, [4, 8, 8], nn.Conv3d, [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]], [1] * 3, 2, [1] * 2,
                  input_size=(8, 8))
    with pytest.raises(AssertionError, match="at least 2 stages"):
        UMambaBot(1, 1, [4], nn.Conv2d, [[3, 3]], [[1, 1]], [1], 2, [], input_size=(8, 8))
    with pytest.raises(AssertionError, match=r"kernel_sizes needs one entry per stage \(3\)"):
        UMambaBot(1, 3, [4, 8, 8], nn.Conv3d, [[3, 3, 3]] * 2, kwargs["strides"], [1] * 3, 2, [1] * 2,
                  input_size=(8, 8, 8))
    single = arch_kwargs([4], [[1, 1]], kernels=[[3, 3]], blocks=2, decoder_blocks=2)
    with pytest.raises(PlanError, match="n_stages=1"):
        build_umamba_bot(NetworkPlan.from_arch_kwargs(single, (8, 8), 1, 2), True)


def test_blocks_basic_res_block_and_upsample():
    block = BasicResBlock(nn.Conv3d, 2, 4, [1, 3, 3], [1, 2, 2], use_1x1conv=True, norm_op=nn.InstanceNorm3d,
                          nonlin=nn.LeakyReLU)
    assert block(torch.randn(1, 2, 3, 8, 8)).shape == (1, 4, 3, 4, 4)
    assert block.conv1.padding == (0, 1, 1) and block.conv1.bias is not None and block.conv2.bias is not None
    with pytest.raises(ValueError, match="use_1x1conv=True"):
        BasicResBlock(nn.Conv2d, 2, 4, 3, 1, use_1x1conv=False)
    up = UpsampleLayer(nn.Conv3d, 4, 2, [1, 2, 2])
    assert up(torch.randn(1, 4, 3, 4, 4)).shape == (1, 2, 3, 8, 8)
    stage = residual_stage(nn.Conv2d, 3, 5, 3, 2, n_blocks=3, conv_bias=False, norm_op=nn.InstanceNorm2d,
                           nonlin=nn.ReLU)
    assert len(stage) == 3 and stage[1].conv1.conv.bias is None and stage(torch.randn(1, 3, 8, 8)).shape == \
        (1, 5, 4, 4)
    with pytest.raises(ValueError, match="n_blocks=0"):
        residual_stage(nn.Conv2d, 3, 5, 3, 1, n_blocks=0)
