"""LoG-VMamba's mixers (ARCHITECTURES.md §3.2, §3.3): local (LTX) and global (GTX) token extractors around one scan.

- ``NeighbourUnfold``: LTX's neighbourhood stacking, a convolution with a fixed one-hot kernel (``weight``, a
  frozen Parameter, never a Conv module so He init leaves it alone).
- ``VSSScanMixer`` and its four forms ``VanillaScanMixer`` (SS3D), ``LocalTokenMixer`` (LTX, SS3DConv),
  ``GlobalTokenMixer`` (GTX, SS3Depth), ``LocalGlobalTokenMixer`` (LoG, SS3DepthConv): in_proj -> spatial conv
  -> [unfold] -> [global tokens interleaved] -> one forward selective scan -> [fold] -> out_norm -> SiLU(z)
  gate -> out_proj. The scan parameters and the scan branch are the shared SSM core
  (``nnunetv2_mamba.layers.ssm``) in VMamba's parameter layout.
- ``VSSBlock`` (``ln``, ``self_attention``, ``drop_path``) and ``LoGMambaLayer`` (the per-stage wrapper,
  ``mamba`` = VSSBlock, run in fp32 with autocast off).

Every mixer is sized from a ``LoGStageSpec`` (``logvmamba_geometry``) for one feature map.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op
from dynamic_network_architectures.building_blocks.regularization import DropPath

from nnunetv2_mamba.layers import (init_dt_projection_, run_mixer, selective_scan_branch, ssm_state_parameters,
                                   state_matrix)
from nnunetv2_mamba.network_architectures.logvmamba_geometry import (
    LOCAL_SQUEEZE, ROLE_GLOBAL, ROLE_LOCAL, ROLE_LOCAL_GLOBAL, ROLE_VANILLA, LoGStageSpec, even_interleave,
    global_grid_conv_geometry, make_stage_spec)

__all__ = ["NeighbourUnfold", "VSSScanMixer", "VanillaScanMixer", "LocalTokenMixer", "GlobalTokenMixer",
           "LocalGlobalTokenMixer", "VSSBlock", "LoGMambaLayer"]

#: Dimensionalities the mixers support.
SPATIAL_DIMS = (2, 3)


class NeighbourUnfold(nn.Module):
    """Stack every channel's 3^D neighbourhood as channels: c -> c * 3^D + s, zero padding (LTX "Unfold").

    s enumerates the kernel offsets in C order (3D: s = kd*9 + kh*3 + kw, value at offset (kd-1, kh-1, kw-1)).
    It is a convolution with a fixed one-hot kernel, stored as the frozen Parameter ``weight`` (as the
    reference, so it appears in parameter counts) and deliberately not a Conv module, so whole-model He
    initialisation cannot overwrite it.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if dim not in SPATIAL_DIMS:
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
        if dim not in SPATIAL_DIMS or len(spec.map_size) != dim:
            raise ValueError(f"Stage spec map size {list(spec.map_size)} does not match dim={dim}.")
        conv_op = convert_dim_to_conv_op(dim)
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
        self.dt_projs_weight = nn.Parameter(torch.empty(1, self.scan_channels, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(1, self.scan_channels))
        init_dt_projection_(self.dt_projs_weight, self.dt_projs_bias, dt_min=dt_min, dt_max=dt_max,
                            dt_init_floor=dt_init_floor)
        self.A_logs, self.Ds = ssm_state_parameters(self.scan_channels, self.d_state)

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
        return selective_scan_branch(sequence, state_matrix(self.A_logs), self.x_proj_weight[0],
                                     self.dt_projs_weight[0], self.dt_projs_bias[0], self.Ds, backend=self.backend)

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
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1); got {drop_path}.")
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = mixer
        # Multiplies by the per-sample mask / keep probability (never skips the branch), so dropped samples
        # give zero, not missing, gradients (DDP).
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output, same shape as x (B, *S, C)."""
        return x + self.drop_path(self.self_attention(self.ln(x)))


class LoGMambaLayer(nn.Module):
    """Per-stage wrapper on (B, C, *S) maps: VSSBlock on channels-last tokens, in the mixer precision.

    Never fp16 (Mamba overflows in fp16): fp32 with autocast off, or bf16 autocast on a bf16 GPU with the
    residual stream in fp32 (ARCHITECTURES.md §0.6).
    """

    def __init__(self, spec: LoGStageSpec, dim: int, d_state: int = 16, d_conv: int = 3, drop_path: float = 0.1,
                 backend: Optional[str] = None):
        super().__init__()
        self.spec = spec
        self.mamba = VSSBlock(spec.channels, VSSScanMixer(spec, dim, d_state, d_conv, backend), drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mixed map (B, C, *S), fp32."""
        return run_mixer(lambda features: self.mamba(features.float().movedim(1, -1)).movedim(-1, 1), x)
