"""LoG-VMamba (Dang, Nguyen, Tiulpin): local and global token extractors on a U-Mamba-Enc backbone (ARCHITECTURES.md §3).

Pieces, smallest first
----------------------
- ``even_interleave(n_spatial, n_global)``: index maps of the paper's "Interleaved" placement of global tokens
  among the spatial tokens (config ``depth_mode: even``); computed once per stage, kept as buffers.
- ``NeighbourUnfold``: LTX's neighbourhood stacking, a convolution with a fixed one-hot kernel (``weight``, a
  frozen Parameter, never a Conv module so He init leaves it alone).
- ``VSSScanMixer`` and its four forms ``VanillaScanMixer`` (SS3D), ``LocalTokenMixer`` (LTX, SS3DConv),
  ``GlobalTokenMixer`` (GTX, SS3Depth), ``LocalGlobalTokenMixer`` (LoG, SS3DepthConv): in_proj -> spatial conv
  -> [unfold] -> [global tokens interleaved] -> one forward selective scan -> [fold] -> out_norm -> SiLU(z)
  gate -> out_proj. The scan is ``nnunetv2_mamba.ssm.selective_scan`` with VMamba-style parameters.
- ``VSSBlock`` (``ln``, ``self_attention``, ``drop_path``) and ``LoGMambaLayer`` (the per-stage wrapper,
  ``mamba`` = VSSBlock, run in fp32 with autocast off).
- ``logvmamba_stage_specs`` / ``logvmamba_topology``: the plan -> per-stage roles mapping of §3.4 (the GTX grid
  stride t, grid size, squeeze q, number of global tokens G, interleave (k, r), scan channels Dseq, dt_rank R).
- ``LoGVMamba``: stem (+ max-pool), U-Mamba-Enc stages each followed by a ``LoGMambaLayer``, a decoder with
  additive skips, a full-resolution head; one output tensor (no deep supervision).
- ``build_logvmamba(plan, deep_supervision, variant)``: the network exactly as the trainers build it.

Variants: ``"LoG"`` (roles L / LoG / G from the plan), ``"L"`` (LTX at every stage), ``"G"`` (GTX at every
stage). Everything that depends on the patch size (GTX grid, ``depth_fc`` size, interleave maps) is derived
from the plan at construction and checked again in forward with a message naming the expected size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_pool_op

from nnunetv2_mamba.layers import run_in_fp32
from nnunetv2_mamba.network_architectures.blocks import BasicResBlock, UpsampleLayer, init_he, residual_stage
from nnunetv2_mamba.network_architectures.umamba import UMambaEncoder, umamba_block_counts
from nnunetv2_mamba.plans import NetworkPlan, PlanError
from nnunetv2_mamba.ssm import selective_scan

logger = logging.getLogger(__name__)

__all__ = [
    "ROLE_LOCAL", "ROLE_GLOBAL", "ROLE_LOCAL_GLOBAL", "ROLE_VANILLA", "VARIANTS", "GRID_TARGET", "LOCAL_SQUEEZE", "NEIGHBOURS",
    "GRID_CONV_GEOMETRY", "EvenInterleave", "even_interleave", "global_grid_stride", "global_grid_conv_geometry",
    "global_grid_size", "LoGStageSpec", "make_stage_spec", "LoGVMambaTopology", "logvmamba_stage_specs", "logvmamba_topology",
    "DropPath", "NeighbourUnfold", "VSSScanMixer", "VanillaScanMixer", "LocalTokenMixer", "GlobalTokenMixer",
    "LocalGlobalTokenMixer", "VSSBlock", "LoGMambaLayer", "LoGVMambaDecoder", "LoGVMamba", "build_logvmamba",
]

ROLE_LOCAL = "L"            # LTX only
ROLE_GLOBAL = "G"           # GTX only
ROLE_LOCAL_GLOBAL = "LoG"   # LTX sequence with GTX tokens computed from the unfolded tensor
ROLE_VANILLA = "SS"         # neither extractor (SS3D / SS2D); not used by the trainers
VARIANTS = ("LoG", "L", "G")

#: Target GTX grid edge g per dimensionality (§3.4 rule 3): the grid stride t brings each axis near g.
GRID_TARGET = {3: 8, 2: 32}
#: LTX channel squeeze sq (3D reference 16; the 2D reference constant is 8).
LOCAL_SQUEEZE = {3: 16, 2: 8}
#: LTX neighbourhood size nb = 3^D.
NEIGHBOURS = {3: 27, 2: 9}
#: Largest GTX grid stride the reference defines a kernel for.
MAX_GRID_STRIDE = 8
#: GTX depth_conv geometry per axis, keyed by the stride t: (kernel, dilation, padding) (reference table).
GRID_CONV_GEOMETRY = {1: (1, 1, 0), 2: (3, 1, 1), 4: (3, 2, 2), 8: (5, 2, 3)}
#: Squeeze of the first G-role stage and of the later ones (§3.4 rule 5).
FIRST_GLOBAL_SQUEEZE, LATER_GLOBAL_SQUEEZE = 2, 8


# ----------------------------------------------------------------------------------------------------------
# Geometry: interleave maps, GTX grid, per-stage roles
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvenInterleave:
    """Index maps of the "even" placement of ``n_global`` global tokens among ``n_spatial`` spatial tokens.

    ``source[p]`` is the index, in ``cat([spatial tokens, global tokens])``, of the token at position p of the
    interleaved sequence; ``spatial_positions[i]`` is where spatial token i lands (increasing);
    ``global_positions[j]`` where global token j lands. ``interval`` = k and ``n_head`` = r of the spec.
    """

    n_spatial: int
    n_global: int
    interval: int
    n_head: int
    source: np.ndarray
    spatial_positions: np.ndarray
    global_positions: np.ndarray

    @property
    def length(self) -> int:
        """Return the interleaved sequence length L + G."""
        return self.n_spatial + self.n_global


def even_interleave(n_spatial: int, n_global: int) -> EvenInterleave:
    """Return the "even" interleave maps for L spatial and G global tokens (ARCHITECTURES.md §3.3).

    k = ceil(L/G), p = k + 1; the global slots are start, start + p, ... < L + G with
    start = ceil((G - floor(L/k)) / p) * p; the r = G - #slots remaining global tokens go first (positions
    0 .. r-1), the slots hold global tokens r .. G-1 in order, and every other position >= r (not a multiple
    of p) holds the spatial tokens in order.
    """
    n_spatial, n_global = int(n_spatial), int(n_global)
    if n_spatial < 1 or n_global < 1:
        raise ValueError(f"even interleave needs at least one spatial and one global token; got L={n_spatial}, "
                         f"G={n_global}.")
    total = n_spatial + n_global
    interval = -(-n_spatial // n_global)  # ceil(L / G) without floats
    period = interval + 1
    head_estimate = n_global - n_spatial // interval
    start = -(-head_estimate // period) * period
    slots = np.arange(start, total, period, dtype=np.int64)
    n_head = n_global - len(slots)
    positions = np.arange(total, dtype=np.int64)
    spatial_positions = positions[(positions >= n_head) & (positions % period != 0)]
    global_positions = np.concatenate([np.arange(max(n_head, 0), dtype=np.int64), slots])
    # The layout must be a permutation: L spatial slots, G global slots, nothing empty, nothing shared.
    occupied = np.zeros(total, dtype=np.int64)
    if n_head >= 0:
        np.add.at(occupied, spatial_positions, 1)
        np.add.at(occupied, global_positions, 1)
    if n_head < 0 or len(spatial_positions) != n_spatial or not np.all(occupied == 1):
        raise ValueError(f"The even interleave of L={n_spatial} spatial and G={n_global} global tokens does not "
                         f"give a permutation (k={interval}, r={n_head}); choose another patch size.")
    source = np.empty(total, dtype=np.int64)
    source[spatial_positions] = np.arange(n_spatial, dtype=np.int64)
    source[global_positions] = n_spatial + np.arange(n_global, dtype=np.int64)
    return EvenInterleave(n_spatial, n_global, interval, n_head, source, spatial_positions, global_positions)


def global_grid_stride(map_size: Sequence[int], grid_target: int) -> Tuple[int, ...]:
    """Return the GTX stride t per axis: min(8, 2^ceil(log2(size/g))) if size > g, else 1 (§3.4 rule 3)."""
    strides = []
    for size in map_size:
        stride = 1
        while stride < MAX_GRID_STRIDE and stride * grid_target < int(size):  # smallest 2^m with size <= 2^m g
            stride *= 2
        strides.append(stride)
    return tuple(strides)


def global_grid_conv_geometry(grid_stride: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """Return (kernel, dilation, padding) per axis of the GTX depth_conv for the per-axis stride t."""
    for t in grid_stride:
        if t not in GRID_CONV_GEOMETRY:
            raise ValueError(f"GTX grid stride {t} is not one of {sorted(GRID_CONV_GEOMETRY)}.")
    kernel, dilation, padding = zip(*(GRID_CONV_GEOMETRY[t] for t in grid_stride))
    return tuple(kernel), tuple(dilation), tuple(padding)


def global_grid_size(map_size: Sequence[int], grid_stride: Sequence[int]) -> Tuple[int, ...]:
    """Return the GTX grid per axis: floor((r + 2p - d(k-1) - 1) / t) + 1 (the depth_conv output size)."""
    kernel, dilation, padding = global_grid_conv_geometry(grid_stride)
    return tuple((int(r) + 2 * p - d * (k - 1) - 1) // t + 1
                 for r, k, d, p, t in zip(map_size, kernel, dilation, padding, grid_stride))


@dataclass(frozen=True)
class LoGStageSpec:
    """Everything a LoG-VMamba stage's mixer is sized from (one row of the §5 table)."""

    index: int
    map_size: Tuple[int, ...]
    channels: int                       # C = d_model = d_inner (expand 1)
    role: str                           # "L", "LoG" or "G"
    scan_channels: int                  # Dseq
    dt_rank: int                        # R
    n_spatial: int                      # L
    grid_stride: Optional[Tuple[int, ...]] = None    # t (GTX roles only)
    grid_size: Optional[Tuple[int, ...]] = None      # depth_conv output per axis
    grid_positions: Optional[int] = None             # Pgrid = prod(grid_size)
    squeeze: Optional[int] = None                    # q
    n_global: int = 0                                # G = Dseq / q
    interleave: Optional[Tuple[int, int]] = None     # (k, r)

    @property
    def uses_local(self) -> bool:
        """Return whether the stage unfolds LTX neighbourhoods."""
        return self.role in (ROLE_LOCAL, ROLE_LOCAL_GLOBAL)

    @property
    def uses_global(self) -> bool:
        """Return whether the stage interleaves GTX global tokens."""
        return self.role in (ROLE_GLOBAL, ROLE_LOCAL_GLOBAL)


def _largest_power_of_two_divisor(value: int, cap: int) -> int:
    """Return the largest power of two <= cap that divides value."""
    result = 1
    while result * 2 <= cap and value % (result * 2) == 0:
        result *= 2
    return result


def make_stage_spec(index: int, role: str, channels: int, map_size: Sequence[int], dim: int, squeeze: int = 1,
                    grid_stride: Optional[Sequence[int]] = None) -> LoGStageSpec:
    """Return the spec of one mixer with a given role ("L", "LoG", "G", "SS") on a map of ``map_size``.

    Dseq = C/sq * 3^D with LTX, else C; R = ceil(Dseq/16) (LTX's "d_model" is C/sq * 3^D, expand is 1). GTX
    roles get the grid stride t (default: the §3.4 rule), the grid, G = Dseq/q global tokens and the
    interleave (k, r); q is reduced to the largest power of two dividing Dseq.
    """
    roles = (ROLE_LOCAL, ROLE_LOCAL_GLOBAL, ROLE_GLOBAL, ROLE_VANILLA)
    if role not in roles:
        raise ValueError(f"role must be one of {roles}; got {role!r}.")
    map_size, channels = tuple(int(v) for v in map_size), int(channels)
    if len(map_size) != dim or dim not in GRID_TARGET:
        raise ValueError(f"map size {list(map_size)} does not fit a {dim}D LoG-VMamba (2D or 3D).")
    n_spatial = int(np.prod(map_size))
    if role in (ROLE_LOCAL, ROLE_LOCAL_GLOBAL):
        if channels % LOCAL_SQUEEZE[dim]:
            raise PlanError(f"LoG-VMamba's local token extractor (LTX) groups channels by {LOCAL_SQUEEZE[dim]} in "
                            f"{dim}D, but LoG stage {index} has {channels} features. Use features_per_stage that "
                            f"are multiples of {LOCAL_SQUEEZE[dim]} (nnU-Net's defaults are), or the G-VMamba "
                            f"variant.")
        scan_channels = channels // LOCAL_SQUEEZE[dim] * NEIGHBOURS[dim]
    else:
        scan_channels = channels
    fields: Dict[str, Any] = {}
    if role in (ROLE_GLOBAL, ROLE_LOCAL_GLOBAL):
        grid_stride = tuple(int(t) for t in grid_stride) if grid_stride is not None else \
            global_grid_stride(map_size, GRID_TARGET[dim])
        grid_size = global_grid_size(map_size, grid_stride)
        if min(grid_size) < 1:
            raise PlanError(f"The GTX grid of LoG stage {index} is empty ({list(grid_size)}) for map "
                            f"{list(map_size)} and stride {list(grid_stride)}; use a larger patch size.")
        squeeze = _largest_power_of_two_divisor(scan_channels, int(squeeze))
        n_global = scan_channels // squeeze
        layout = even_interleave(n_spatial, n_global)
        fields = dict(grid_stride=grid_stride, grid_size=grid_size, grid_positions=int(np.prod(grid_size)),
                      squeeze=squeeze, n_global=n_global, interleave=(layout.interval, layout.n_head))
    return LoGStageSpec(index=int(index), map_size=map_size, channels=channels, role=role,
                        scan_channels=scan_channels, dt_rank=math.ceil(scan_channels / 16), n_spatial=n_spatial,
                        **fields)


def logvmamba_stage_specs(map_sizes: Sequence[Sequence[int]], channels: Sequence[int], dim: int,
                          variant: str = "LoG") -> List[LoGStageSpec]:
    """Return the per-stage mixer specs of the §3.4 mapping for the LoG stages' map sizes and channels.

    Full model roles: stage 0 L; later stages LoG if any GTX stride t > 1, else G. Squeeze: LoG stages 1, the
    first G stage 2, later G stages 8 (reduced to a power of two dividing Dseq). Variant "L": LTX everywhere.
    Variant "G": GTX everywhere, squeeze 1 where the full model has L or LoG, G stages keep their squeeze.
    """
    if variant not in VARIANTS:
        raise ValueError(f"LoG-VMamba variant must be one of {VARIANTS}; got {variant!r}.")
    if dim not in GRID_TARGET:
        raise ValueError(f"LoG-VMamba supports 2D and 3D; got dim={dim}.")
    if len(map_sizes) != len(channels):
        raise ValueError(f"{len(map_sizes)} map sizes but {len(channels)} channel counts.")
    specs, n_global_role_stages = [], 0
    for index, (map_size, stage_channels) in enumerate(zip(map_sizes, channels)):
        grid_stride = global_grid_stride(map_size, GRID_TARGET[dim])
        full_role = ROLE_LOCAL if index == 0 else (ROLE_LOCAL_GLOBAL if max(grid_stride) > 1 else ROLE_GLOBAL)
        role = {"LoG": full_role, "L": ROLE_LOCAL, "G": ROLE_GLOBAL}[variant]
        squeeze = 1
        if role == ROLE_GLOBAL and full_role == ROLE_GLOBAL:
            squeeze = FIRST_GLOBAL_SQUEEZE if n_global_role_stages == 0 else LATER_GLOBAL_SQUEEZE
        if full_role == ROLE_GLOBAL:
            n_global_role_stages += 1
        specs.append(make_stage_spec(index, role, stage_channels, map_size, dim, squeeze, grid_stride))
    return specs


@dataclass(frozen=True)
class LoGVMambaTopology:
    """The plan -> LoG-VMamba mapping (§3.4): pooling, LoG stages, block counts, mixer specs."""

    dim: int
    pool_stride: Tuple[int, ...]                 # stem max-pool kernel = stride = plan S[1]; head upsample scale
    stem_kernel: Tuple[int, ...]                 # plan K[0]
    stem_features: int                           # plan F[0]
    features: Tuple[int, ...]                    # LoG stage i: F[i]
    kernels: Tuple[Tuple[int, ...], ...]         # LoG stage i: K[i+1]
    strides: Tuple[Tuple[int, ...], ...]         # LoG stage 0: 1; stage i: S[i+1]
    input_size: Tuple[int, ...]                  # map entering LoG stage 0 (patch // S[1])
    map_sizes: Tuple[Tuple[int, ...], ...]       # rho_i = plan r_{i+1}
    encoder_blocks: Tuple[int, ...]              # U-Mamba override of nb[:nL] with n := nL
    decoder_blocks: Tuple[int, ...]              # U-Mamba override of nd[:nL-1]; j = 0 lowest resolution
    stages: Tuple[LoGStageSpec, ...]

    @property
    def n_stages(self) -> int:
        """Return the number of LoG stages nL = n - 1."""
        return len(self.features)


def logvmamba_topology(input_size: Sequence[int], features_per_stage: Sequence[int],
                       kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                       n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                       variant: str = "LoG") -> LoGVMambaTopology:
    """Return the LoG-VMamba topology for an nnU-Net plan (n >= 3 stages, per-axis kernels and strides).

    The inputs are read, never modified. Raises PlanError naming the plan value when the plan cannot be mapped.
    """
    input_size = tuple(int(v) for v in input_size)
    dim = len(input_size)
    n_stages = len(features_per_stage)
    if dim not in GRID_TARGET:
        raise PlanError(f"LoG-VMamba supports 2D and 3D patches; patch_size {list(input_size)} has {dim} axes.")
    if n_stages < 3:
        raise PlanError(f"LoG-VMamba needs a plan with at least 3 stages (a full-resolution stem and at least two "
                        f"LoG stages); this plan has n_stages={n_stages}. Use a larger patch size so that "
                        f"nnU-Net plans more stages.")
    for name, values, count in (("kernel_sizes", kernel_sizes, n_stages), ("strides", strides, n_stages),
                                ("n_blocks_per_stage", n_blocks_per_stage, n_stages),
                                ("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1)):
        if len(values) != count:
            raise PlanError(f"Plan entry {name} has {len(values)} entries; with n_stages={n_stages} it needs {count}.")
    kernels = [tuple(int(k) for k in kernel) for kernel in kernel_sizes]
    plan_strides = [tuple(int(s) for s in stride) for stride in strides]
    for name, values in (("kernel_sizes", kernels), ("strides", plan_strides)):
        for s, value in enumerate(values):
            if len(value) != dim:
                raise PlanError(f"Plan entry {name}[{s}]={list(value)} has {len(value)} axes; the patch has {dim}.")
    if any(s != 1 for s in plan_strides[0]):
        raise PlanError(f"LoG-VMamba's stem runs at full resolution, so the plan's first stride must be all ones; "
                        f"got strides[0]={list(plan_strides[0])}. Use an nnU-Net plan (they always start with 1).")
    pool_stride = plan_strides[1]
    if any(size % s for size, s in zip(input_size, pool_stride)):
        raise PlanError(f"patch_size {list(input_size)} is not divisible by the stem pooling strides[1]="
                        f"{list(pool_stride)}; use a patch size that is a multiple of it.")
    n_log = n_stages - 1
    log_strides = [tuple([1] * dim)] + plan_strides[2:]
    pooled = tuple(size // s for size, s in zip(input_size, pool_stride))
    map_sizes, current = [], pooled
    for s, stride in enumerate(log_strides):
        if any(c % v for c, v in zip(current, stride)):
            raise PlanError(f"patch_size {list(input_size)} is not divisible by the cumulative strides of the plan "
                            f"(LoG stage {s}, map {list(current)}, stride {list(stride)}); use a patch size that is "
                            f"a multiple of the cumulative stride.")
        current = tuple(c // v for c, v in zip(current, stride))
        map_sizes.append(current)
    features = [int(f) for f in features_per_stage[:n_log]]
    encoder_blocks, decoder_blocks = umamba_block_counts([int(v) for v in n_blocks_per_stage[:n_log]],
                                                         [int(v) for v in n_conv_per_stage_decoder[:n_log - 1]])
    specs = logvmamba_stage_specs(map_sizes, features, dim, variant)
    return LoGVMambaTopology(dim=dim, pool_stride=pool_stride, stem_kernel=kernels[0],
                             stem_features=int(features_per_stage[0]), features=tuple(features),
                             kernels=tuple(kernels[1:]), strides=tuple(log_strides), input_size=pooled,
                             map_sizes=tuple(map_sizes), encoder_blocks=tuple(encoder_blocks),
                             decoder_blocks=tuple(decoder_blocks), stages=tuple(specs))


# ----------------------------------------------------------------------------------------------------------
# Mixer building blocks
# ----------------------------------------------------------------------------------------------------------

_CONV_OPS = {2: nn.Conv2d, 3: nn.Conv3d}
_MAX_POOL_OPS = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the branch for a random subset of samples and rescale the rest."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1); got {drop_prob}.")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x, or x masked per sample and divided by the keep probability (training only)."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        # Multiply (never skip) so that dropped samples still give zero, not missing, gradients (DDP).
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """Return the drop probability for the module's repr."""
        return f"drop_prob={self.drop_prob}"


class NeighbourUnfold(nn.Module):
    """Stack every channel's 3^D neighbourhood as channels: c -> c * 3^D + s, zero padding (LTX "Unfold").

    s enumerates the kernel offsets in C order (3D: s = kd*9 + kh*3 + kw, value at offset (kd-1, kh-1, kw-1)).
    It is a convolution with a fixed one-hot kernel, stored as the frozen Parameter ``weight`` (as the
    reference, so it appears in parameter counts) and deliberately not a Conv module, so whole-model He
    initialisation cannot overwrite it.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if dim not in _CONV_OPS:
            raise ValueError(f"NeighbourUnfold supports 2D and 3D; got dim={dim}.")
        if kernel_size % 2 != 1:
            raise ValueError(f"NeighbourUnfold needs an odd kernel size; got {kernel_size}.")
        self.dim, self.kernel_size = int(dim), int(kernel_size)
        self.neighbours = self.kernel_size ** self.dim
        one_hot = torch.eye(self.neighbours).reshape(self.neighbours, 1, *([self.kernel_size] * self.dim))
        self.weight = nn.Parameter(one_hot, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (B, C * 3^D, *S) neighbourhood channels of x (B, C, *S)."""
        batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
        conv = F.conv3d if self.dim == 3 else F.conv2d
        # Every input channel is convolved with the same one-hot bank: fold channels into the batch axis.
        unfolded = conv(x.reshape(batch * channels, 1, *spatial), self.weight.to(x.dtype),
                        padding=self.kernel_size // 2)
        return unfolded.reshape(batch, channels * self.neighbours, *spatial)

    def extra_repr(self) -> str:
        """Return the dimension and kernel size for the module's repr."""
        return f"dim={self.dim}, kernel_size={self.kernel_size}"


class VSSScanMixer(nn.Module):
    """VMamba-style mixer on channels-last tokens (B, *S, C) -> (B, *S, C), one forward scan (K = 1).

    ``in_proj`` (C -> 2C, no bias) splits into x and the gate z. x goes channels-first through the spatial
    conv (``conv3d``/``conv2d``, kernel d_conv, non-causal) and SiLU: depthwise, or with ``local_tokens`` a
    grouped conv C -> C/sq followed by ``unfold`` (Dseq = C/sq * 3^D channels). With ``global_tokens``,
    ``depth_conv`` (strided grouped conv on the Dseq-channel map) + ``depth_fc`` (Linear over the Pgrid grid
    positions) + SiLU make G = Dseq/q global tokens of dimension Dseq, interleaved evenly into the sequence
    and dropped after the scan. The scan uses ``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``,
    ``A_logs``, ``Ds`` (mamba_ssm initialisation); then ``fold`` (Dseq -> C, LTX only), ``out_norm``, the
    SiLU(z) gate and ``out_proj``. Sized for one feature map (``spec.map_size``): GTX and the interleave maps
    depend on it.
    """

    def __init__(self, spec: LoGStageSpec, dim: int, d_state: int = 16, d_conv: int = 3,
                 backend: Optional[str] = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4):
        super().__init__()
        if dim not in _CONV_OPS or len(spec.map_size) != dim:
            raise ValueError(f"Stage spec map size {list(spec.map_size)} does not match dim={dim}.")
        conv_op = _CONV_OPS[dim]
        self.dim, self.spec, self.backend = int(dim), spec, backend
        self.d_model = self.d_inner = int(spec.channels)  # expand = 1
        self.d_state, self.d_conv = int(d_state), int(d_conv)
        self.scan_channels, self.dt_rank = int(spec.scan_channels), int(spec.dt_rank)
        self.local_tokens, self.global_tokens = spec.uses_local, spec.uses_global

        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=False)
        conv_out = self.d_inner // LOCAL_SQUEEZE[dim] if self.local_tokens else self.d_inner
        spatial_conv = conv_op(self.d_inner, conv_out, kernel_size=self.d_conv, padding=(self.d_conv - 1) // 2,
                               groups=conv_out, bias=True)
        self._spatial_conv_name = f"conv{dim}d"  # reference name: conv3d (3D) / conv2d (2D)
        self.add_module(self._spatial_conv_name, spatial_conv)
        self.act = nn.SiLU()
        if self.local_tokens:
            self.unfold = NeighbourUnfold(dim, self.d_conv)
            if conv_out * self.unfold.neighbours != self.scan_channels:
                raise ValueError(f"LTX gives {conv_out * self.unfold.neighbours} scan channels; spec says "
                                 f"{self.scan_channels}.")
        if self.global_tokens:
            kernel, dilation, padding = global_grid_conv_geometry(spec.grid_stride)
            self.depth_conv = conv_op(self.scan_channels, spec.n_global, kernel_size=kernel, stride=spec.grid_stride,
                                      dilation=dilation, padding=padding, groups=spec.n_global, bias=True)
            self.depth_fc = nn.Linear(spec.grid_positions, self.scan_channels, bias=True)
            layout = even_interleave(spec.n_spatial, spec.n_global)
            # Index maps are geometry, not state: non-persistent buffers follow .to(device), stay out of state_dict.
            self.register_buffer("interleave_source", torch.from_numpy(layout.source), persistent=False)
            self.register_buffer("spatial_positions", torch.from_numpy(layout.spatial_positions), persistent=False)

        # VMamba-style scan parameters with K = 1 direction (leading axis of size 1, as the reference).
        x_proj = nn.Linear(self.scan_channels, self.dt_rank + 2 * self.d_state, bias=False)  # default init
        self.x_proj_weight = nn.Parameter(x_proj.weight.detach().clone().unsqueeze(0))
        dt_init_std = self.dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(
            torch.empty(1, self.scan_channels, self.dt_rank).uniform_(-dt_init_std, dt_init_std))
        # softplus(bias) = dt with dt log-uniform in [dt_min, dt_max]: the Mamba initialisation of Delta.
        dt = torch.exp(torch.rand(self.scan_channels) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).unsqueeze(0))
        self.dt_projs_bias._no_reinit = True
        a_init = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.scan_channels, 1)
        self.A_logs = nn.Parameter(torch.log(a_init))
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(self.scan_channels))
        self.Ds._no_weight_decay = True

        if self.local_tokens:
            self.fold = nn.Linear(self.scan_channels, self.d_inner, bias=False)
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)

    @property
    def spatial_conv(self) -> nn.Module:
        """Return the spatial conv (``conv3d`` or ``conv2d``)."""
        return getattr(self, self._spatial_conv_name)

    def _check_map(self, spatial_shape: Sequence[int]) -> None:
        """Raise ValueError if the feature map differs from the one the mixer was sized for."""
        if tuple(spatial_shape) != self.spec.map_size:
            raise ValueError(f"LoG-VMamba stage {self.spec.index} was built for a {list(self.spec.map_size)} feature "
                             f"map but got {list(spatial_shape)}. The network is tied to the configuration's patch "
                             f"size (global tokens and interleave maps are sized from it): feed patches of that "
                             f"size (nnU-Net's sliding-window predictor does).")

    def _global_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Return the G global tokens (B, Dseq, G) computed from the (B, Dseq, *S) scan features."""
        grid = self.depth_conv(features)
        if grid.shape[2:].numel() != self.spec.grid_positions:
            raise ValueError(f"GTX grid of stage {self.spec.index} has {list(grid.shape[2:])} positions, expected "
                             f"{list(self.spec.grid_size)} (Pgrid={self.spec.grid_positions}) for a "
                             f"{list(self.spec.map_size)} map; rebuild the network for this patch size.")
        tokens = self.depth_fc(grid.flatten(2))  # (B, G, Dseq): Linear over the grid positions
        return self.act(tokens.transpose(1, 2))

    def _scan(self, sequence: torch.Tensor) -> torch.Tensor:
        """Return the forward selective scan (B, Dseq, L') of the sequence (B, Dseq, L')."""
        projected = torch.einsum("bdl,cd->bcl", sequence, self.x_proj_weight[0])
        delta_low_rank, b_matrix, c_matrix = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], 1)
        delta = torch.einsum("brl,dr->bdl", delta_low_rank, self.dt_projs_weight[0])
        return selective_scan(sequence.float(), delta.float().contiguous(), -torch.exp(self.A_logs.float()),
                              b_matrix.float().contiguous(), c_matrix.float().contiguous(), D=self.Ds.float(),
                              z=None, delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True,
                              backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mixed channels-last tokens (B, *S, C) of x (B, *S, C)."""
        spatial_shape = x.shape[1:-1]
        self._check_map(spatial_shape)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        features = self.act(self.spatial_conv(x.movedim(-1, 1).contiguous()))
        if self.local_tokens:
            features = self.unfold(features)
        sequence = features.flatten(2)  # (B, Dseq, L), C order
        if self.global_tokens:
            interleaved = torch.cat([sequence, self._global_tokens(features)], dim=-1)
            interleaved = interleaved.index_select(-1, self.interleave_source)
            y = self._scan(interleaved).index_select(-1, self.spatial_positions)
        else:
            y = self._scan(sequence)
        y = y.transpose(1, 2).reshape(x.shape[0], *spatial_shape, self.scan_channels)
        if self.local_tokens:
            y = self.fold(y)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        """Return the stage geometry for the module's repr."""
        return (f"role={self.spec.role}, d_model={self.d_model}, scan_channels={self.scan_channels}, "
                f"dt_rank={self.dt_rank}, d_state={self.d_state}, map_size={self.spec.map_size}, "
                f"n_global={self.spec.n_global}, backend={self.backend or 'auto'}")


class VanillaScanMixer(VSSScanMixer):
    """SS3D / SS2D: depthwise conv + SiLU, one forward scan over the C-order tokens (no LTX, no GTX)."""

    def __init__(self, channels: int, map_size: Sequence[int], d_state: int = 16, d_conv: int = 3,
                 backend: Optional[str] = None):
        super().__init__(make_stage_spec(0, ROLE_VANILLA, channels, map_size, len(map_size)), len(map_size), d_state,
                         d_conv, backend)


class LocalTokenMixer(VSSScanMixer):
    """LTX (SS3DConv): grouped conv C -> C/sq, SiLU, neighbourhood unfold, scan, ``fold`` back to C."""

    def __init__(self, channels: int, map_size: Sequence[int], d_state: int = 16, d_conv: int = 3,
                 backend: Optional[str] = None):
        super().__init__(make_stage_spec(0, ROLE_LOCAL, channels, map_size, len(map_size)), len(map_size), d_state,
                         d_conv, backend)


class GlobalTokenMixer(VSSScanMixer):
    """GTX (SS3Depth): depthwise conv + SiLU, G = C/q global tokens interleaved evenly, scan, tokens dropped."""

    def __init__(self, channels: int, map_size: Sequence[int], squeeze: int = 1, grid_stride=None,
                 d_state: int = 16, d_conv: int = 3, backend: Optional[str] = None):
        spec = make_stage_spec(0, ROLE_GLOBAL, channels, map_size, len(map_size), squeeze, grid_stride)
        super().__init__(spec, len(map_size), d_state, d_conv, backend)


class LocalGlobalTokenMixer(VSSScanMixer):
    """LoG (SS3DepthConv): the LTX sequence with GTX global tokens computed from the unfolded tensor."""

    def __init__(self, channels: int, map_size: Sequence[int], squeeze: int = 1, grid_stride=None,
                 d_state: int = 16, d_conv: int = 3, backend: Optional[str] = None):
        spec = make_stage_spec(0, ROLE_LOCAL_GLOBAL, channels, map_size, len(map_size), squeeze, grid_stride)
        super().__init__(spec, len(map_size), d_state, d_conv, backend)


class VSSBlock(nn.Module):
    """x + DropPath(mixer(LayerNorm_eps1e-6(x))) on channels-last tokens (B, *S, C); no MLP."""

    def __init__(self, hidden_dim: int, mixer: nn.Module, drop_path: float = 0.1):
        super().__init__()
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = mixer
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output, same shape as x (B, *S, C)."""
        return x + self.drop_path(self.self_attention(self.ln(x)))


class LoGMambaLayer(nn.Module):
    """Per-stage wrapper on (B, C, *S) maps: VSSBlock on channels-last tokens, in fp32 with autocast off.

    fp16 and bf16 inputs are cast to fp32 and the output stays fp32 (ARCHITECTURES.md §0.6): Mamba overflows in fp16.
    """

    def __init__(self, spec: LoGStageSpec, dim: int, d_state: int = 16, d_conv: int = 3, drop_path: float = 0.1,
                 backend: Optional[str] = None):
        super().__init__()
        self.spec = spec
        self.mamba = VSSBlock(spec.channels, VSSScanMixer(spec, dim, d_state, d_conv, backend), drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mixed map (B, C, *S) in fp32."""
        return run_in_fp32(lambda features: self.mamba(features.float().movedim(1, -1)).movedim(-1, 1), x)


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------

class LoGVMambaDecoder(nn.Module):
    """Decoder with additive skips: upsample (interpolation + 1x1 conv), add the skip, residual stage.

    j = 0 is the lowest resolution. No segmentation heads: the network's head works at full resolution.
    ``deep_supervision`` exists for nnU-Net's ``set_deep_supervision_enabled`` and is ignored. The encoder is
    registered as ``decoder.encoder`` as in U-Mamba and the reference (parameters shared; counts de-duplicate).
    """

    def __init__(self, encoder: UMambaEncoder, n_conv_per_stage: Sequence[int], deep_supervision: bool = False,
                 upsample_mode: str = "trilinear"):
        super().__init__()
        n_stages = len(encoder.output_channels)
        if len(n_conv_per_stage) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage (decoder) has {len(n_conv_per_stage)} entries; with {n_stages} "
                             f"LoG stages it needs {n_stages - 1}.")
        self.encoder = encoder
        self.deep_supervision = deep_supervision
        features = encoder.output_channels
        stage_kwargs = encoder.stage_kwargs
        upsample_layers, stages = [], []
        for j in range(n_stages - 1):
            below, skip = n_stages - 1 - j, n_stages - 2 - j
            upsample_layers.append(UpsampleLayer(encoder.conv_op, features[below], features[skip],
                                                 encoder.strides[below], upsample_mode))
            stages.append(residual_stage(encoder.conv_op, features[skip], features[skip],
                                         encoder.kernel_sizes[skip], 1, n_conv_per_stage[j], **stage_kwargs))
        self.upsample_layers = nn.ModuleList(upsample_layers)
        self.stages = nn.ModuleList(stages)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the decoded map at LoG stage 0's resolution (B, F[0], *S0)."""
        x = skips[-1]
        for j, (upsample, stage) in enumerate(zip(self.upsample_layers, self.stages)):
            x = stage(upsample(x) + skips[-(j + 2)])
        return x


class LoGVMamba(nn.Module):
    """LoG-VMamba segmentation network (2D/3D) for any nnU-Net plan with n >= 3 stages (ARCHITECTURES.md §3.2, §3.4).

    Arguments are the nnU-Net plan's (``n_stages`` etc. describe the plan, not the LoG stages). ``variant``
    picks the mixers: "LoG" (L / LoG / G roles), "L" (LTX only), "G" (GTX only). Always returns one tensor
    (B, num_classes, *patch); ``decoder.deep_supervision`` exists and is ignored.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], num_classes: int, n_conv_per_stage_decoder: Sequence[int],
                 input_size: Sequence[int], conv_bias: bool = True, norm_op: Optional[Type[nn.Module]] = None,
                 norm_op_kwargs: Optional[Dict[str, Any]] = None, dropout_op: Optional[Type[nn.Module]] = None,
                 dropout_op_kwargs: Optional[Dict[str, Any]] = None, nonlin: Optional[Type[nn.Module]] = None,
                 nonlin_kwargs: Optional[Dict[str, Any]] = None, deep_supervision: bool = False,
                 variant: str = "LoG", d_state: int = 16, d_conv: int = 3, drop_path: float = 0.1,
                 backend: Optional[str] = None):
        super().__init__()
        assert len(features_per_stage) == n_stages, f"features_per_stage needs {n_stages} entries"
        topology = logvmamba_topology(input_size, features_per_stage, kernel_sizes, strides, n_blocks_per_stage,
                                      n_conv_per_stage_decoder, variant)
        dim = topology.dim
        assert convert_conv_op_to_dim(conv_op) == dim, f"conv_op {conv_op.__name__} does not fit {list(input_size)}"
        interpolation = "trilinear" if dim == 3 else "bilinear"
        self.topology, self.variant = topology, variant
        self.input_size = tuple(input_size)
        specs = topology.stages

        def make_mixer(stage: int, channels: int, map_size: Tuple[int, ...]) -> nn.Module:
            spec = specs[stage]
            assert (channels, tuple(map_size)) == (spec.channels, spec.map_size), \
                f"encoder stage {stage} ({channels} channels on {list(map_size)}) does not fit the LoG mapping"
            return LoGMambaLayer(spec, dim, d_state, d_conv, drop_path, backend)

        pool = get_matching_pool_op(conv_op, pool_type="max")
        self.encoder = UMambaEncoder(
            input_channels, topology.n_stages, list(topology.features), conv_op,
            [list(k) for k in topology.kernels], [list(s) for s in topology.strides], list(topology.encoder_blocks),
            conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
            input_size=topology.input_size, mixer_factory=make_mixer,
            stem_pool=pool(kernel_size=topology.pool_stride, stride=topology.pool_stride),
            stem_kernel_size=list(topology.stem_kernel))
        self.decoder = LoGVMambaDecoder(self.encoder, list(topology.decoder_blocks), deep_supervision,
                                        upsample_mode=interpolation)
        stem_features = topology.stem_features
        self.upsample = UpsampleLayer(conv_op, topology.features[0], stem_features, topology.pool_stride, interpolation)
        self.conv = BasicResBlock(conv_op, stem_features, stem_features, list(topology.stem_kernel), 1,
                                  use_1x1conv=False, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin,
                                  nonlin_kwargs=nonlin_kwargs)
        self.seg_layer = conv_op(stem_features, num_classes, kernel_size=1, bias=True)
        # Whole-model He init, as the reference: it also re-initialises the mixers' spatial/GTX convs; the Unfold
        # kernel is not a Conv module and stays one-hot.
        init_he(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (B, num_classes, *S) at the input resolution."""
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"LoG-VMamba was built for patch size {list(self.input_size)} but got an input of "
                             f"spatial size {list(x.shape[2:])}; its global tokens are tied to the patch size.")
        skips, stem_output = self.encoder.forward_with_stem(x)
        decoded = self.decoder(skips)
        out = stem_output + self.upsample(decoded)
        return self.seg_layer(self.conv(out))


def build_logvmamba(plan: NetworkPlan, deep_supervision: bool = False, variant: str = "LoG",
                    backend: Optional[str] = None) -> LoGVMamba:
    """Return LoG-VMamba (variant "LoG", "L" or "G") for the plan, as the trainers build it.

    ``deep_supervision`` is stored on ``decoder.deep_supervision`` only: the network has one output.
    """
    try:
        network = LoGVMamba(
            **plan.unet_kwargs(with_input_size=True), deep_supervision=deep_supervision, variant=variant,
            backend=backend)
    except ValueError as error:  # the LoG mapping of §3.4 cannot be made for this plan
        if isinstance(error, PlanError):
            raise
        raise PlanError(f"Cannot build LoG-VMamba ({variant}) from this plan: {error}") from error
    logger.debug("Built LoG-VMamba (%s) for patch %s: roles %s.", variant, plan.patch_size,
                 [spec.role for spec in network.topology.stages])
    return network
