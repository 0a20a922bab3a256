"""``Mamba``: the selective state-space mixer, parameter-compatible with ``mamba_ssm.Mamba``.

Same parameter names, shapes and initialisation (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so a
state_dict saved from mamba_ssm, or from this layer on any backend, loads into this layer on any other.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_mamba.layers.ssm import (init_dt_projection_, selective_scan_branch, ssm_state_parameters,
                                      state_matrix)
from nnunetv2_mamba.ssm.scan import select_backend


class Mamba(nn.Module):
    """Mamba mixer on tokens (batch, length, d_model) -> (batch, length, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = int(d_model)  # upstream sometimes passes numpy ints (channel tokens): normalise
        self.d_state = int(d_state)
        self.d_conv = int(d_conv)
        self.expand = expand
        self.d_inner = int(expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend  # None: $NNUNETV2_MAMBA_BACKEND or automatic choice

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory)
        # Padding d_conv - 1 on both sides; keeping the first L outputs makes the conv causal.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
                                padding=self.d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory)

        # S4D/Mamba initialisation of Delta's projection, A and D (layers/ssm.py), after the default-initialised
        # Linear layers so that the random numbers are drawn in mamba_ssm's order.
        init_dt_projection_(self.dt_proj.weight, self.dt_proj.bias, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        self.A_log, self.D = ssm_state_parameters(self.d_inner, self.d_state, device)

    def forward(self, hidden_states: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """Return the mixed tokens (batch, length, d_model), or with ``channels_first`` the same values as a
        contiguous (batch, d_model, length) map (what a network reshapes to its feature map)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects tokens (batch, length, {self.d_model}); "
                             f"got shape {tuple(hidden_states.shape)}.")
        batch, length, _ = hidden_states.shape
        A = state_matrix(self.A_log)
        backend = select_backend(hidden_states.transpose(1, 2), A, self.backend)  # (batch, channels, length) view
        # causal-conv1d's kernels (and so the fused paths) handle conv widths 2 to 4.
        fusable = 2 <= self.d_conv <= 4
        fused_inner = backend.fused_mamba_inner() if fusable else None
        if fused_inner is not None:
            # (d, batch * length) layout, as mamba_ssm builds it: xz then has unit stride along the tokens.
            xz = self.in_proj.weight @ hidden_states.reshape(batch * length, self.d_model).t()
            xz = xz.view(2 * self.d_inner, batch, length).transpose(0, 1)
            if self.in_proj.bias is not None:
                xz = xz + self.in_proj.bias.to(xz.dtype)[None, :, None]
            out = fused_inner(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                              self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            return out.transpose(1, 2).contiguous() if channels_first else out
        # Split before transposing: the two halves' gradients then meet in in_proj's (batch, length, 2 d_inner)
        # layout, so its backward GEMM reads them without a transposing copy.
        x, z = (half.transpose(1, 2) for half in self.in_proj(hidden_states).chunk(2, dim=-1))  # (batch, d_inner, L)
        fused_conv = backend.causal_conv1d() if fusable else None
        if fused_conv is not None:
            x = fused_conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :length])

        y = selective_scan_branch(x, A, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.D, z=z,
                                  backend=backend.name)
        if channels_first:
            # out_proj as W @ y per batch element: the GEMM writes the (batch, d_model, L) map itself, where
            # projecting tokens would need a transposing copy after it.
            out = torch.bmm(self.out_proj.weight.expand(batch, -1, -1), y)
            return out if self.out_proj.bias is None else out + self.out_proj.bias[:, None]
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"dt_rank={self.dt_rank}, backend={self.backend or 'auto'}")
