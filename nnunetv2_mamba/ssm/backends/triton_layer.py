"""The Mamba layer's inner part as one autograd Function around the Triton scan, with recompute.

Same semantics and arguments as mamba_ssm's ``mamba_inner_fn`` (the layer's fused path, ``layers/mamba.py``):

    x, z  = xz                                   (B, 2 d_inner, L) -> two (B, d_inner, L) halves
    x     = SiLU(causal depthwise conv1d(x))
    dt, B, C = x_proj(x)                         (dt_rank, d_state, d_state per token)
    delta = dt_proj(dt)                          (the bias is added inside the scan, before the softplus)
    y     = selective_scan(x, delta, A, B, C, D, z, delta_bias, softplus)
    out   = out_proj(y)

The unfused path keeps every intermediate for autograd (conv output, its SiLU, x_dbl, delta, plus the scan's own
inputs): about 12 d_inner bytes per token in bf16. This Function keeps only ``xz`` and the weights; its backward
recomputes the conv, x_proj and dt_proj (cheap next to the scan) and calls the scan's backward directly, without
re-running the scan's forward. out_proj stays outside (autograd keeps its input y).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunetv2_mamba.ssm.backends.triton_conv import causal_conv1d_silu
from nnunetv2_mamba.ssm.backends.triton_scan import make_plan, scan_backward, scan_forward


def _branch(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight):
    """Return (u, delta, B, C) of the scan for the conv input x (B, D, L): the recomputable part."""
    u = causal_conv1d_silu(x, conv_weight.squeeze(1), conv_bias)  # token-major, as x_proj's GEMM reads it
    dt_rank, d_state = dt_proj_weight.shape[1], (x_proj_weight.shape[0] - dt_proj_weight.shape[1]) // 2
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)  # (B, L, dt_rank + 2 d_state)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = F.linear(dt, dt_proj_weight).transpose(1, 2)  # (B, D, L), a view of token-major memory
    return u, delta, B.transpose(1, 2), C.transpose(1, 2)


class MambaInnerTriton(torch.autograd.Function):
    """y = scan(SiLU(conv(x)), ...) * SiLU(z) for xz = (x, z); keeps xz and the weights only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, delta_softplus):
        x, z = xz.chunk(2, dim=1)
        u, delta, B, C = _branch(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight)
        plan, groups = make_plan(u, A, B, C)
        D, delta_bias = D.contiguous(), delta_bias.contiguous()  # the kernels index them with unit stride
        y = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, plan)
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias = ctx.saved_tensors
        x, z = xz.detach().chunk(2, dim=1)
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight)]
        with torch.enable_grad():
            u, delta, B, C = _branch(*leaves)
        plan, groups = make_plan(u, A, B, C)
        du, ddelta, dA, dB, dC, dD, dz, dbias = scan_backward(
            u.detach(), delta.detach(), A, B.detach(), C.detach(), D, z, delta_bias, ctx.delta_softplus, plan,
            groups, grad_y)  # read through its strides: token-major as out_proj's backward gives it
        # Through x_proj, dt_proj and the conv: one backward over the recomputed graph from its four outputs.
        torch.autograd.backward([u, delta, B, C], [du, ddelta, dB, dC])
        dx, dconv_weight, dconv_bias, dx_proj_weight, ddt_proj_weight = (t.grad if t is not None else None
                                                                          for t in leaves)
        dxz = torch.cat([dx.to(xz.dtype), dz.to(xz.dtype)], dim=1)
        return dxz, dconv_weight, dconv_bias, dx_proj_weight, ddt_proj_weight, dA, dD, dbias, None


def mamba_inner_triton(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True):
    """Return out_proj(inner(xz)) (batch, L, d_model): ``mamba_inner_fn``'s arguments (B, C must be None: the
    input-dependent B and C come from x_proj, as in every network here)."""
    assert B is None and C is None, "mamba_inner_triton computes B and C from x_proj"
    assert D is not None and delta_bias is not None, "the Mamba layer always has D and dt_proj's bias"
    y = MambaInnerTriton.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias,
                               bool(delta_softplus))
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
