"""LoG-VMamba's integer geometry (ARCHITECTURES.md §3.3, §3.4): interleave maps, GTX grid, per-stage roles.

Plain integers and index maps, no parameters: the "even" interleave of global tokens among the spatial tokens
(``even_interleave``), the GTX grid stride, depth_conv geometry and grid size, the per-stage mixer specs
(``LoGStageSpec``, ``make_stage_spec``, ``logvmamba_stage_specs``) and the plan -> network mapping
(``LoGVMambaTopology``, ``logvmamba_topology``). The mixers are sized from a ``LoGStageSpec``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_mamba.network_architectures.umamba import umamba_block_counts
from nnunetv2_mamba.plans import PlanError

__all__ = [
    "ROLE_LOCAL", "ROLE_GLOBAL", "ROLE_LOCAL_GLOBAL", "ROLE_VANILLA", "VARIANTS", "GRID_TARGET", "LOCAL_SQUEEZE",
    "NEIGHBOURS", "MAX_GRID_STRIDE", "GRID_CONV_GEOMETRY", "FIRST_GLOBAL_SQUEEZE", "LATER_GLOBAL_SQUEEZE",
    "EvenInterleave", "even_interleave", "global_grid_stride", "global_grid_conv_geometry", "global_grid_size",
    "LoGStageSpec", "make_stage_spec", "logvmamba_stage_specs", "LoGVMambaTopology", "logvmamba_topology",
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
