"""LoG-VMamba geometry, mixers and networks on tiny CPU plans (ARCHITECTURES.md §3, §5).

Geometry: the "even" interleave maps (exhaustively for small sizes, randomly for large ones, against the spec's
rules re-stated here), the GTX grid (against the output shape of a real strided conv), and the §5 tables for the
128^3 and the anisotropic plan. Mixers: Unfold against an explicit neighbour gather, a whole LoG mixer against
a re-computation from the spec with explicit tensor operations and a sequential scan. Networks: shapes for 2D,
3D and anisotropic plans with 4 to 7 stages, backward without unused parameters, state-dict round trip, plan
immutability, He init leaving Unfold alone, fp32 mixer policy, clear errors.
"""
import copy
import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_mamba.network_architectures.logvmamba import LoGVMamba, build_logvmamba
from nnunetv2_mamba.network_architectures.logvmamba_geometry import (
    GRID_CONV_GEOMETRY, even_interleave, global_grid_conv_geometry, global_grid_size, global_grid_stride,
    logvmamba_topology, make_stage_spec)
from nnunetv2_mamba.network_architectures.logvmamba_mixers import (
    LocalGlobalTokenMixer, LocalTokenMixer, GlobalTokenMixer, LoGMambaLayer, NeighbourUnfold, VanillaScanMixer,
    VSSBlock)
from nnunetv2_mamba.plans import NetworkPlan, PlanError
from tests.builders import arch_kwargs

# Tiny plans with few tokens that still exercise every role (3D LoG needs a map > 8, 2D a map > 32).
PLANS = {
    # 4 stages, isotropic: LoG maps 8^3 (L), 4^3 (G), 2^3 (G).
    "3d_4stages": (arch_kwargs([16, 16, 32, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]), (16, 16, 16)),
    # 5 stages, anisotropic kernels/strides: (2,4,32) L, (2,4,16) LoG, (2,2,8) G, (1,1,4) G.
    "3d_aniso_5stages": (arch_kwargs([16, 16, 16, 32, 32], [[1, 1, 1], [1, 1, 2], [1, 1, 2], [1, 2, 2], [2, 2, 2]],
                                     kernels=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                                     blocks=[2, 2, 1, 1, 1], decoder_blocks=[1, 2, 1, 1]), (2, 4, 64)),
    # 6 stages, ResEnc-style block key: (2,8,64) L, (2,4,32) LoG, (2,2,16) LoG, (1,1,8) G, (1,1,4) G.
    "3d_resenc_6stages": (arch_kwargs([16] * 6, [[1, 1, 1], [1, 1, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 1, 2]],
                                      blocks=[1, 2, 1, 1, 1, 1], blocks_key="n_blocks_per_stage"), (2, 8, 128)),
    # 2D, 4 stages: (4,128) L, (2,64) LoG, (1,32) G.
    "2d_4stages": (arch_kwargs([8, 8, 16, 16], [[1, 1], [1, 2], [2, 2], [2, 2]]), (4, 256)),
    # 2D, 7 stages: (8,256) L, (4,128) LoG, (2,64) LoG, (2,32) G, (2,16) G, (2,8) G.
    "2d_7stages": (arch_kwargs([8, 8, 8, 16, 16, 16, 16],
                               [[1, 1], [1, 2], [2, 2], [2, 2], [1, 2], [1, 2], [1, 2]]), (8, 512)),
}


def make_plan(name, input_channels=2, num_classes=3):
    arch, patch = PLANS[name]
    return NetworkPlan.from_arch_kwargs(arch, patch, input_channels, num_classes)


def benchmark_arch(dim=3):
    """The §5 worked-example plan: F=[32,64,128,256,320,320], K=3, S=[1,2,2,2,2,2], 2 convs per stage."""
    return arch_kwargs([32, 64, 128, 256, 320, 320], [[1, 1, 1]] + [[2, 2, 2]] * 5, blocks=[2] * 6,
                       decoder_blocks=[2] * 5)


ANISO_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]


# ----------------------------------------------------------------------------------------------------------
# Interleave maps
# ----------------------------------------------------------------------------------------------------------

def check_layout(n_spatial, n_global):
    """Assert every rule of the spec's "even" placement for one (L, G) pair; return (k, r)."""
    layout = even_interleave(n_spatial, n_global)
    total = n_spatial + n_global
    k = math.ceil(n_spatial / n_global)
    p = k + 1
    assert layout.interval == k
    r = layout.n_head
    assert 0 <= r <= n_global
    spatial, globals_ = layout.spatial_positions, layout.global_positions
    # A permutation: L spatial slots, G global slots, nothing empty, nothing shared.
    assert len(spatial) == n_spatial and len(globals_) == n_global
    assert np.array_equal(np.sort(np.concatenate([spatial, globals_])), np.arange(total))
    # Head: global tokens 0..r-1 at positions 0..r-1; then slots every p positions, in order.
    assert np.array_equal(globals_[:r], np.arange(r))
    slots = globals_[r:]
    assert np.all(np.diff(slots) == p) and np.all(slots % p == 0) and np.all(slots >= r)
    # Every position >= r that is a multiple of p is a global slot; all others >= r are spatial, in order.
    positions = np.arange(r, total)
    assert np.array_equal(positions[positions % p != 0], spatial)
    # source maps positions back to cat([spatial, global]) indices.
    assert np.array_equal(layout.source[spatial], np.arange(n_spatial))
    assert np.array_equal(layout.source[globals_], np.arange(n_spatial, total))
    return k, r


def test_even_interleave_exhaustive_small_sizes():
    for n_spatial in range(1, 97):
        for n_global in range(1, 97):
            check_layout(n_spatial, n_global)


def test_even_interleave_random_large_sizes():
    rng = random.Random(0)
    for _ in range(200):
        check_layout(rng.randint(1, 60000), rng.randint(1, 3000))


@pytest.mark.parametrize("n_spatial,n_global,expected", [
    (32768, 108, (304, 1)), (4096, 216, (19, 1)), (512, 128, (4, 0)), (64, 40, (2, 8)), (1568, 432, (4, 40))])
def test_even_interleave_worked_examples(n_spatial, n_global, expected):
    assert check_layout(n_spatial, n_global) == expected


def test_even_interleave_positions_of_worked_examples():
    g_stage = even_interleave(512, 128)  # i=3: a global token at 0, 5, 10, ...
    assert g_stage.global_positions[:3].tolist() == [0, 5, 10]
    bottleneck = even_interleave(64, 40)  # i=4: 8 global tokens at the head, then one at 9, 12, ..., 102
    positions = bottleneck.global_positions.tolist()
    assert positions[:8] == list(range(8)) and positions[8:] == list(range(9, 103, 3))


def test_even_interleave_rejects_empty():
    with pytest.raises(ValueError, match="G=0"):
        even_interleave(10, 0)


# ----------------------------------------------------------------------------------------------------------
# GTX grid and the §5 tables
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,target,expected", [(64, 8, 8), (33, 8, 8), (32, 8, 4), (17, 8, 4), (16, 8, 2),
                                                   (9, 8, 2), (8, 8, 1), (1000, 8, 8), (256, 32, 8), (64, 32, 2)])
def test_global_grid_stride_rule(size, target, expected):
    # t = min(8, 2^ceil(log2(size/g))) if size > g else 1
    formula = 1 if size <= target else min(8, 2 ** math.ceil(math.log2(size / target)))
    assert formula == expected
    assert global_grid_stride([size], target) == (expected,)


@pytest.mark.parametrize("map_size", [(64, 64, 64), (32, 32, 32), (14, 64, 56), (7, 32, 28), (9, 17, 40), (3, 5, 7)])
def test_global_grid_size_matches_a_real_strided_conv(map_size):
    stride = global_grid_stride(map_size, 8)
    kernel, dilation, padding = global_grid_conv_geometry(stride)
    for t, k, d, p in zip(stride, kernel, dilation, padding):
        assert (k, d, p) == GRID_CONV_GEOMETRY[t]
    conv = nn.Conv3d(1, 1, kernel, stride=stride, dilation=dilation, padding=padding)
    with torch.no_grad():
        out = conv(torch.zeros(1, 1, *map_size))
    assert tuple(out.shape[2:]) == global_grid_size(map_size, stride)


def test_worked_example_128_table():
    plan = NetworkPlan.from_arch_kwargs(benchmark_arch(), (128, 128, 128), 4, 3)
    topology = logvmamba_topology(plan.patch_size, plan.features_per_stage, plan.kernel_sizes, plan.strides,
                                  plan.n_blocks_per_stage, plan.n_conv_per_stage_decoder)
    assert topology.n_stages == 5
    assert topology.pool_stride == (2, 2, 2)
    assert topology.features == (32, 64, 128, 256, 320)
    assert topology.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4
    assert list(topology.encoder_blocks) == [2, 2, 2, 1, 1]
    assert list(topology.decoder_blocks) == [2, 2, 2, 1]
    rows = [(s.map_size[0], s.channels, s.role, s.scan_channels, s.dt_rank, s.n_spatial,
             s.grid_stride[0] if s.grid_stride else None, s.grid_positions, s.squeeze, s.n_global,
             s.n_spatial + s.n_global, s.interleave) for s in topology.stages]
    assert rows == [
        (64, 32, "L", 54, 4, 262144, None, None, None, 0, 262144, None),
        (32, 64, "LoG", 108, 7, 32768, 4, 512, 1, 108, 32876, (304, 1)),
        (16, 128, "LoG", 216, 14, 4096, 2, 512, 1, 216, 4312, (19, 1)),
        (8, 256, "G", 256, 16, 512, 1, 512, 2, 128, 640, (4, 0)),
        (4, 320, "G", 320, 20, 64, 1, 64, 8, 40, 104, (2, 8)),
    ]


def test_worked_example_anisotropic_table():
    plan = NetworkPlan.from_arch_kwargs(arch_kwargs([32, 64, 128, 256, 320, 320], ANISO_STRIDES),
                                        (14, 256, 224), 4, 3)
    topology = logvmamba_topology(plan.patch_size, plan.features_per_stage, plan.kernel_sizes, plan.strides,
                                  plan.n_blocks_per_stage, plan.n_conv_per_stage_decoder)
    assert topology.pool_stride == (1, 2, 2)
    rows = [(s.map_size, s.role, s.grid_stride, s.grid_positions, s.squeeze, s.n_global) for s in topology.stages]
    assert rows == [
        ((14, 128, 112), "L", None, None, None, 0),
        ((14, 64, 56), "LoG", (2, 8, 8), 392, 1, 108),
        ((7, 32, 28), "LoG", (1, 4, 4), 392, 1, 216),
        ((7, 16, 14), "LoG", (1, 2, 2), 392, 1, 432),
        ((7, 8, 7), "G", (1, 1, 1), 392, 2, 160),
    ]
    third = topology.stages[3]
    assert (third.scan_channels, third.n_spatial, third.interleave) == (432, 1568, (4, 40))
    assert all(s.grid_size == (7, 8, 7) for s in topology.stages[1:])


def test_variant_roles_and_squeeze_on_the_128_plan():
    plan = NetworkPlan.from_arch_kwargs(benchmark_arch(), (128, 128, 128), 4, 3)
    args = (plan.patch_size, plan.features_per_stage, plan.kernel_sizes, plan.strides, plan.n_blocks_per_stage,
            plan.n_conv_per_stage_decoder)
    local = logvmamba_topology(*args, variant="L").stages
    assert [s.role for s in local] == ["L"] * 5
    assert [s.scan_channels for s in local] == [54, 108, 216, 432, 540]
    global_ = logvmamba_topology(*args, variant="G").stages
    assert [s.role for s in global_] == ["G"] * 5
    # squeeze 1 where the full model has L / LoG; G stages keep 2 and 8.
    assert [s.squeeze for s in global_] == [1, 1, 1, 2, 8]
    assert [s.scan_channels for s in global_] == [32, 64, 128, 256, 320]
    assert global_[0].grid_stride == (8, 8, 8) and global_[0].grid_positions == 512


def test_squeeze_reduced_to_a_power_of_two_dividing_dseq():
    spec = make_stage_spec(4, "G", 20, (4, 4, 4), 3, squeeze=8)
    assert spec.squeeze == 4 and spec.n_global == 5


def test_full_size_mixers_are_sized_from_the_table():
    """Build the 128^3 network (no forward) and check the GTX / scan parameter shapes of every stage."""
    network = build_logvmamba(NetworkPlan.from_arch_kwargs(benchmark_arch(), (128, 128, 128), 4, 3))
    for spec, layer in zip(network.topology.stages, network.encoder.mamba_layers):
        mixer = layer.mamba.self_attention
        assert mixer.x_proj_weight.shape == (1, spec.dt_rank + 32, spec.scan_channels)
        assert mixer.dt_projs_weight.shape == (1, spec.scan_channels, spec.dt_rank)
        assert mixer.A_logs.shape == (spec.scan_channels, 16) and mixer.Ds.shape == (spec.scan_channels,)
        if spec.uses_global:
            assert mixer.depth_fc.weight.shape == (spec.scan_channels, spec.grid_positions)
            assert mixer.depth_conv.out_channels == spec.n_global
            assert mixer.depth_conv.stride == spec.grid_stride
        if spec.uses_local:
            assert mixer.unfold.weight.numel() == 729
            assert mixer.fold.weight.shape == (spec.channels, spec.scan_channels)


# ----------------------------------------------------------------------------------------------------------
# Unfold, DropPath, mixers
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 3])
def test_unfold_equals_explicit_neighbour_gather(dim):
    torch.manual_seed(0)
    spatial = (3, 4, 5)[-dim:]
    x = torch.randn(2, 3, *spatial)
    unfold = NeighbourUnfold(dim)
    assert not unfold.weight.requires_grad and unfold.weight.numel() == 3 ** (2 * dim)
    out = unfold(x)
    padded = F.pad(x, [1, 1] * dim)
    offsets = np.ndindex(*([3] * dim))  # C order: s = kd*9 + kh*3 + kw
    for s, offset in enumerate(offsets):
        window = padded[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offset, spatial))]
        for c in range(3):
            assert torch.equal(out[:, c * 3 ** dim + s], window[:, c])


def test_block_drop_path_masks_whole_samples_and_rescales():
    drop = VSSBlock(2, nn.Identity(), drop_path=0.5).drop_path
    x = torch.ones(64, 3, 2)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # one decision per sample
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


@pytest.mark.parametrize("drop_path", [-0.1, 1.0])
def test_block_rejects_a_drop_path_outside_zero_one(drop_path):
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        VSSBlock(2, nn.Identity(), drop_path=drop_path)


def sequential_scan(u, delta, A, B, C, D):
    """Reference selective scan, one step at a time (u, delta (D, L); A (D, N); B, C (N, L))."""
    state = torch.zeros(A.shape, dtype=torch.float64)
    ys = []
    for t in range(u.shape[-1]):
        state = torch.exp(delta[:, t, None] * A) * state + delta[:, t, None] * B[None, :, t] * u[:, t, None]
        ys.append((state * C[None, :, t]).sum(-1) + D * u[:, t])
    return torch.stack(ys, -1)


def reference_mixer(mixer, x):
    """Recompute a VSS mixer from the spec with explicit operations (float64); x (1, *S, C)."""
    mixer = copy.deepcopy(mixer).double()
    spec = mixer.spec
    x = x.double()
    xz = x @ mixer.in_proj.weight.T
    xs, z = xz[..., :spec.channels], xz[..., spec.channels:]
    conv = mixer.spatial_conv
    feats = F.conv3d(xs.movedim(-1, 1), conv.weight, conv.bias, padding=1, groups=conv.groups)
    feats = feats * torch.sigmoid(feats)
    if spec.uses_local:
        feats = NeighbourUnfold(3).double()(feats)
    seq = feats.flatten(2)[0]  # (Dseq, L)
    if spec.uses_global:
        dc = mixer.depth_conv
        grid = F.conv3d(feats, dc.weight, dc.bias, stride=dc.stride, padding=dc.padding, dilation=dc.dilation,
                        groups=dc.groups).flatten(2)[0]  # (G, Pgrid)
        tokens = grid @ mixer.depth_fc.weight.T + mixer.depth_fc.bias  # (G, Dseq)
        tokens = (tokens * torch.sigmoid(tokens)).T  # (Dseq, G)
        # Build the interleaved sequence position by position from the spec's rule.
        L, G = seq.shape[1], tokens.shape[1]
        k = math.ceil(L / G)
        p = k + 1
        start = math.ceil((G - L // k) / p) * p
        slots = list(range(start, L + G, p))
        r = G - len(slots)
        columns, spatial_positions, next_spatial = [], [], 0
        slot_set = set(slots)
        for q in range(L + G):
            if q < r:
                columns.append(tokens[:, q])
            elif q in slot_set:
                columns.append(tokens[:, r + slots.index(q)])
            else:
                columns.append(seq[:, next_spatial])
                spatial_positions.append(q)
                next_spatial += 1
        seq = torch.stack(columns, -1)
    proj = mixer.x_proj_weight[0] @ seq
    dt_low, B, C = proj[:spec.dt_rank], proj[spec.dt_rank:spec.dt_rank + 16], proj[spec.dt_rank + 16:]
    delta = F.softplus(mixer.dt_projs_weight[0] @ dt_low + mixer.dt_projs_bias[0][:, None])
    y = sequential_scan(seq, delta, -torch.exp(mixer.A_logs), B, C, mixer.Ds)
    if spec.uses_global:
        y = y[:, spatial_positions]
    y = y.T.reshape(1, *spec.map_size, -1)
    if spec.uses_local:
        y = y @ mixer.fold.weight.T
    y = F.layer_norm(y, (spec.channels,), mixer.out_norm.weight, mixer.out_norm.bias) * F.silu(z)
    return y @ mixer.out_proj.weight.T


@pytest.mark.parametrize("mixer_class,kwargs", [
    (VanillaScanMixer, {}), (LocalTokenMixer, {}), (GlobalTokenMixer, {"squeeze": 2}),
    (LocalGlobalTokenMixer, {"grid_stride": (1, 2, 1)})])
def test_mixer_matches_spec_recomputation(mixer_class, kwargs):
    torch.manual_seed(0)
    map_size = (2, 4, 3)
    mixer = mixer_class(16, map_size, **kwargs)
    # Non-trivial biases/norm so that every term matters.
    for name, param in mixer.named_parameters():
        if name.endswith("bias") or name.startswith("out_norm"):
            with torch.no_grad():
                param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(1, *map_size, 16)
    out = mixer(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    expected = reference_mixer(mixer, x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_mamba_layer_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    layer = LoGMambaLayer(make_stage_spec(1, "LoG", 16, (2, 4, 12), 3), 3).eval()
    x = torch.randn(1, 16, 2, 4, 12)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x.bfloat16().float()))
    assert reference.shape == x.shape


def test_mixer_rejects_other_map_size():
    mixer = GlobalTokenMixer(16, (2, 4, 4))
    with pytest.raises(ValueError, match=r"built for a \[2, 4, 4\] feature map"):
        mixer(torch.randn(1, 2, 4, 8, 16))


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------

def network_cases():
    for plan_name in PLANS:
        for variant in ("LoG", "L", "G"):
            if variant != "LoG" and plan_name != "3d_aniso_5stages":
                continue
            yield pytest.param(plan_name, variant, id=f"{variant}-{plan_name}")


@pytest.mark.parametrize("plan_name,variant", list(network_cases()))
def test_network_shapes_backward_and_no_unused_parameters(plan_name, variant):
    torch.manual_seed(0)
    plan = make_plan(plan_name)
    network = build_logvmamba(plan, deep_supervision=True, variant=variant)  # DS request is ignored
    network.train()
    assert network.decoder.deep_supervision is True
    assert len(network.encoder.stages) == plan.n_stages - 1 == len(network.encoder.mamba_layers)
    x = torch.randn(1, plan.input_channels, *plan.patch_size)
    out = network(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, plan.num_classes, *plan.patch_size)
    out.square().mean().backward()
    unused = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    frozen = [name for name, p in network.named_parameters() if not p.requires_grad]
    assert frozen and all(name.endswith("unfold.weight") for name in frozen) if variant != "G" else frozen == []
    roles = [spec.role for spec in network.topology.stages]
    if variant == "LoG":
        assert roles[0] == "L" and "G" in roles
    else:
        assert set(roles) == {variant}


def test_expected_roles_of_the_test_plans():
    roles = {name: [s.role for s in build_logvmamba(make_plan(name)).topology.stages] for name in PLANS}
    assert roles == {"3d_4stages": ["L", "G", "G"], "3d_aniso_5stages": ["L", "LoG", "G", "G"],
                     "3d_resenc_6stages": ["L", "LoG", "LoG", "G", "G"], "2d_4stages": ["L", "LoG", "G"],
                     "2d_7stages": ["L", "LoG", "LoG", "G", "G", "G"]}


def test_topology_wiring_of_the_anisotropic_plan():
    plan = make_plan("3d_aniso_5stages")
    network = build_logvmamba(plan)
    assert isinstance(network.encoder.stem_pool, nn.MaxPool3d)
    assert tuple(network.encoder.stem_pool.kernel_size) == (1, 1, 2) == tuple(network.encoder.stem_pool.stride)
    # Stem with the plan's K[0] = (1,3,3); LoG stage i with K[i+1]; decoder stage of LoG stage a with K[a+1].
    assert network.encoder.stem[0].conv1.kernel_size == (1, 3, 3)
    assert [tuple(s[0].conv1.kernel_size) for s in network.encoder.stages] == [(1, 3, 3), (3, 3, 3), (3, 3, 3),
                                                                              (3, 3, 3)]
    assert [tuple(s[0].conv1.stride) for s in network.encoder.stages] == [(1, 1, 1), (1, 1, 2), (1, 2, 2), (2, 2, 2)]
    # Block counts: plan nb [2,2,1,1,1] -> nb[:4] = [2,2,1,1] -> override (n=4): [2,2,1,1]; stem uses nb[0].
    assert [len(s) for s in network.encoder.stages] == [2, 2, 1, 1] and len(network.encoder.stem) == 2
    # Decoder: nd[:3] = [1,2,1] -> override (n=4: j >= 2 gets 1) -> [1,2,1]; trilinear, additive (F[a] in).
    assert [len(s) for s in network.decoder.stages] == [1, 2, 1]
    assert [u.scale_factor for u in network.decoder.upsample_layers] == [(2.0, 2.0, 2.0), (1.0, 2.0, 2.0),
                                                                         (1.0, 1.0, 2.0)]
    assert all(u.mode == "trilinear" for u in network.decoder.upsample_layers)
    assert [s[0].conv1.in_channels for s in network.decoder.stages] == [16, 16, 16]
    assert network.upsample.scale_factor == (1.0, 1.0, 2.0) and network.upsample.mode == "trilinear"
    assert network.conv.conv3 is None and network.conv.conv1.kernel_size == (1, 3, 3)
    assert network.seg_layer.out_channels == 3 and network.seg_layer.bias is not None


def test_forward_wiring_head_adds_stem_output():
    """The head sees stem_output + upsample(decoder(skips)): check by recomputing it from the modules."""
    torch.manual_seed(0)
    network = build_logvmamba(make_plan("3d_4stages")).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        stem = network.encoder.stem(x)
        h = network.encoder.stem_pool(stem)
        skips = []
        for stage, mixer in zip(network.encoder.stages, network.encoder.mamba_layers):
            h = mixer(stage(h))
            skips.append(h)
        h = skips[-1]
        for j, (up, stage) in enumerate(zip(network.decoder.upsample_layers, network.decoder.stages)):
            h = stage(up(h) + skips[-(j + 2)])
        expected = network.seg_layer(network.conv(stem + network.upsample(h)))
        torch.testing.assert_close(network(x), expected)


def test_he_init_keeps_unfold_one_hot_and_zeroes_conv_biases():
    network = build_logvmamba(make_plan("3d_aniso_5stages"))
    unfolds = [m for m in network.modules() if isinstance(m, NeighbourUnfold)]
    assert unfolds
    for unfold in unfolds:
        flat = unfold.weight.flatten(1)
        assert torch.equal(flat, torch.eye(27))
    mixer = network.encoder.mamba_layers[1].mamba.self_attention
    assert torch.count_nonzero(mixer.depth_conv.bias) == 0 and torch.count_nonzero(mixer.conv3d.bias) == 0
    # Scan parameters keep the Mamba initialisation (not touched by He init).
    assert torch.allclose(mixer.A_logs[0], torch.log(torch.arange(1.0, 17.0)))
    dt = F.softplus(mixer.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_direct_construction_is_initialised_as_it_trains():
    plan = make_plan("3d_aniso_5stages")
    torch.manual_seed(0)
    built = build_logvmamba(plan)
    torch.manual_seed(0)
    direct = LoGVMamba(**plan.unet_kwargs(with_input_size=True))
    for (name, expected), value in zip(built.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(value, expected), name
    assert torch.count_nonzero(direct.seg_layer.bias) == 0  # He init: zero conv biases (not PyTorch's default)


def test_state_dict_round_trip_and_keys():
    plan = make_plan("3d_aniso_5stages")
    torch.manual_seed(0)
    source = build_logvmamba(plan).eval()
    torch.manual_seed(1)
    target = build_logvmamba(plan, deep_supervision=True).eval()
    state = source.state_dict()
    assert set(state) == set(target.state_dict())
    assert not any("interleave_source" in key or "spatial_positions" in key for key in state)
    assert "encoder.mamba_layers.1.mamba.self_attention.unfold.weight" in state
    assert "encoder.mamba_layers.1.mamba.self_attention.depth_fc.weight" in state
    assert "encoder.mamba_layers.0.mamba.ln.weight" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    x = torch.randn(1, 2, *plan.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


def test_building_leaves_the_plan_unchanged():
    arch, patch = PLANS["3d_resenc_6stages"]
    arch = copy.deepcopy(arch)
    snapshot = copy.deepcopy(arch)
    plan = NetworkPlan.from_arch_kwargs(arch, patch, 2, 3)
    plan_snapshot = copy.deepcopy(plan)
    for variant in ("LoG", "L", "G"):
        build_logvmamba(plan, variant=variant)
    assert arch == snapshot
    assert plan == plan_snapshot
    # Lists passed straight to the constructor are not modified either (block-count overrides use copies).
    kwargs = dict(features_per_stage=[16] * 6, kernel_sizes=[[3, 3, 3]] * 6, strides=copy.deepcopy(arch["strides"]),
                  n_blocks_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5)
    kept = copy.deepcopy(kwargs)
    LoGVMamba(2, 6, conv_op=nn.Conv3d, num_classes=3, input_size=patch, norm_op=nn.InstanceNorm3d,
              nonlin=nn.LeakyReLU, **kwargs)
    assert kwargs == kept


def test_clear_errors():
    with pytest.raises(PlanError, match="at least 3 stages"):
        build_logvmamba(NetworkPlan.from_arch_kwargs(arch_kwargs([16, 16], [[1, 1, 1], [2, 2, 2]]),
                                                     (8, 8, 8), 1, 2))
    with pytest.raises(PlanError, match="multiples of 16"):
        build_logvmamba(NetworkPlan.from_arch_kwargs(
            arch_kwargs([24, 24, 24], [[1, 1, 1], [2, 2, 2], [2, 2, 2]]), (8, 8, 8), 1, 2))
    # The G variant has no LTX, so the same plan builds.
    build_logvmamba(NetworkPlan.from_arch_kwargs(
        arch_kwargs([24, 24, 24], [[1, 1, 1], [2, 2, 2], [2, 2, 2]]), (8, 8, 8), 1, 2), variant="G")
    with pytest.raises(PlanError, match=r"strides\[0\]"):
        build_logvmamba(NetworkPlan.from_arch_kwargs(
            arch_kwargs([16, 16, 16], [[2, 2, 2], [2, 2, 2], [1, 1, 1]]), (8, 8, 8), 1, 2))
    with pytest.raises(ValueError, match="variant"):
        build_logvmamba(make_plan("3d_4stages"), variant="X")
    network = build_logvmamba(make_plan("3d_4stages"))
    with pytest.raises(ValueError, match=r"patch size \[16, 16, 16\] but got an input of spatial size "
                                         r"\[32, 16, 16\].*feed patches of size \[16, 16, 16\]"):
        network(torch.randn(1, 2, 32, 16, 16))
