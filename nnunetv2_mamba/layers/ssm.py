"""The selective state-space core shared by every mixer: parameter initialisation and the scan branch.

Every mixer (``Mamba``, LoG-VMamba's ``VSSScanMixer``, Vivim's ``STMambaV3``) owns its projections under its own
names and layout; these helpers hold the maths they share (ARCHITECTURES.md §0.5; Gu and Dao, Mamba):

- ``init_dt_projection_``: Delta's projection, dt = softplus(W dt_low_rank + b), with W uniform (or constant)
  of scale dt_rank^-0.5 and b the inverse softplus of a log-uniform dt in [dt_min, dt_max];
- ``ssm_state_parameters``: the S4D-real state matrix A[d, n] = -(n + 1), stored as A_log, and the skip D = 1;
- ``state_matrix``: A = -exp(A_log) in fp32;
- ``selective_scan_branch``: x -> x_proj -> (dt, B, C) -> dt_proj -> selective scan with D, the z gate and
  softplus(dt + bias).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_mamba.ssm.scan import selective_scan

DT_INITS = ("random", "constant")


def init_dt_projection_(weight: torch.Tensor, bias: torch.Tensor, dt_init: str = "random", dt_scale: float = 1.0,
                        dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
    """Initialise Delta's projection in place: ``weight`` (..., channels, dt_rank), ``bias`` (..., channels).

    The weight scale dt_rank^-0.5 * dt_scale gives the initial Delta unit-ish variance; the bias is chosen so that
    softplus(bias) = dt, dt log-uniform in [dt_min, dt_max] and at least dt_init_floor (the S4D/Mamba
    initialisation). Draws the weight first, then one uniform number per channel. The bias is flagged
    ``_no_reinit`` so that mamba-style init helpers leave it alone.
    """
    if dt_init not in DT_INITS:
        raise ValueError(f"dt_init must be 'random' or 'constant'; got {dt_init!r}.")
    dt_init_std = weight.shape[-1] ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            weight.fill_(dt_init_std)
        else:
            weight.uniform_(-dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(bias.numel(), device=bias.device, dtype=bias.dtype)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        inverse_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        bias.copy_(inverse_softplus_dt.view_as(bias))
    bias._no_reinit = True


def ssm_state_parameters(channels: int, d_state: int, device=None) -> Tuple[nn.Parameter, nn.Parameter]:
    """Return (A_log (channels, d_state), D (channels,)): S4D-real A = -(n + 1) stored as log, and D = 1.

    A is stored as log so that A = -exp(A_log) stays negative during training (a decaying state). Both are
    flagged ``_no_weight_decay``; no random numbers are drawn.
    """
    a_init = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(channels, 1)
    a_log = nn.Parameter(torch.log(a_init))
    a_log._no_weight_decay = True
    skip = nn.Parameter(torch.ones(channels, device=device))
    skip._no_weight_decay = True
    return a_log, skip


def state_matrix(a_log: torch.Tensor) -> torch.Tensor:
    """Return the fp32 state matrix A = -exp(A_log) (channels, d_state)."""
    return -torch.exp(a_log.float())


def selective_scan_branch(x: torch.Tensor, A: torch.Tensor, x_proj_weight: torch.Tensor,
                          dt_proj_weight: torch.Tensor, dt_proj_bias: torch.Tensor, D: torch.Tensor,
                          z: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Return the selective scan y (B, channels, L) of x (B, channels, L), a branch's conv + SiLU output.

    Every token is projected (``x_proj_weight`` (dt_rank + 2 d_state, channels), no bias) to a low-rank dt and
    its input-dependent B and C; ``dt_proj_weight`` (channels, dt_rank) lifts dt to one Delta per channel, and
    ``dt_proj_bias`` is added inside the scan before the softplus. ``z`` (B, channels, L) gates the output with
    SiLU(z); ``A`` is ``state_matrix(A_log)``.
    """
    dt_rank, d_state = dt_proj_weight.shape[-1], A.shape[-1]
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (B, L, dt_rank + 2 * d_state)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    dt = F.linear(dt, dt_proj_weight).transpose(1, 2)  # the bias is added inside the scan
    return selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), D=D.float(), z=z,
                          delta_bias=dt_proj_bias.float(), delta_softplus=True, backend=backend)
