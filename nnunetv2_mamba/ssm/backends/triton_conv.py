"""The Mamba layer's causal depthwise conv1d + SiLU in Triton, forward and backward (no compiled extension).

Math, per batch b, channel d and token l, for a conv of width W (``weight`` (D, W), ``bias`` (D,)):

    p_l   = bias + sum_k weight[k] * x_{l - (W - 1) + k}       (x_s = 0 for s < 0: causal zero padding)
    out_l = SiLU(p_l) = p_l * sigmoid(p_l)

Backward, with g_l = dout_l * SiLU'(p_l) and SiLU'(p) = s (1 + p (1 - s)), s = sigmoid(p):

    dx_l      = sum_j weight[W - 1 - j] * g_{l + j}
    dweight_k = sum_{b, l} x_{l - (W - 1) + k} * g_l,      dbias = sum_{b, l} g_l

Why a kernel of our own: torch runs this conv as a grouped conv2d; on the H200 the Mamba layer with torch's conv cost
about three times mamba_ssm's fused layer outside the scan (BENCHMARKS.md, 2026-12-02), and causal-conv1d, which
mamba_ssm uses, is a compiled extension. Every program takes a (BLOCK_L tokens, BLOCK_D channels) tile and reads x
through its strides, so the (B, D, L) half of the in-projection, which is token-major in memory, is read without a
copy; the output is written token-major, the layout the x-projection's GEMM reads. Arithmetic is fp32 whatever the
input dtype; the output and dx take x's dtype, dweight and dbias the parameters'. The backward recomputes p at the W
shifted positions it needs instead of keeping p or the output (the forward saves nothing but its inputs), and sums
dweight / dbias per program (256 tokens) into a partial buffer that torch reduces (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Tile sizes, chosen by registers on sm_90 without a GPU (benchmarks/triton_registers.py, 4 warps, not yet timed):
# the forward at 64 x 32 uses 108 registers; the backward's W x W shifted loads need small tiles (16 x 32: 126
# registers, no spills; one 64 x 32 tile spills), 16 of them per program.
BLOCK_L = 64
BLOCK_D = 32
BACKWARD_BLOCK_L = 16
BACKWARD_TILES = 16  # tiles per backward program: 256 tokens per dweight / dbias partial


@triton.jit
def _silu_preactivation(x_base, stride_l, weight_ptr, bias_ptr, positions, length, offs_d, d_mask,
                        WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Return p (BLOCK_L, BLOCK_D) fp32 at ``positions`` (tokens past the end give finite values, masked later)."""
    p = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    if HAS_BIAS:
        p += tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        source = positions - (WIDTH - 1) + k
        inside = (source >= 0) & (source < length)
        x = tl.load(x_base + source[:, None] * stride_l, mask=inside[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + offs_d * WIDTH + k, mask=d_mask, other=0.0).to(tl.float32)
        p += x.to(tl.float32) * w[None, :]
    return p


@triton.jit
def _tile(x_ptr, x_sb, x_sd, channels, TOKENS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Return this program's first tile of tokens, its channels, batch, channel mask and x pointers (grid: blocks of
    TOKENS tokens, blocks of BLOCK_D channels, batch)."""
    offs_l = tl.program_id(0) * TOKENS + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    batch = tl.program_id(2).to(tl.int64)
    d_mask = offs_d < channels
    return offs_l, offs_d, batch, d_mask, x_ptr + batch * x_sb + offs_d[None, :] * x_sd


@triton.jit
def _causal_conv_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, length, channels,
                                x_sb, x_sd, x_sl, o_sb, o_sd, o_sl,
                                WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_l, offs_d, batch, d_mask, x_base = _tile(x_ptr, x_sb, x_sd, channels, BLOCK_L, BLOCK_L, BLOCK_D)
    p = _silu_preactivation(x_base, x_sl, weight_ptr, bias_ptr, offs_l, length, offs_d, d_mask, WIDTH, HAS_BIAS,
                            BLOCK_L, BLOCK_D)
    out = p * tl.sigmoid(p)
    tl.store(out_ptr + batch * o_sb + offs_l[:, None] * o_sl + offs_d[None, :] * o_sd,
             out.to(out_ptr.dtype.element_ty), mask=(offs_l < length)[:, None] & d_mask[None, :])


@triton.jit
def _causal_conv_backward_kernel(x_ptr, weight_ptr, bias_ptr, grad_ptr, dx_ptr, dweight_part_ptr, dbias_part_ptr,
                                 length, channels, x_sb, x_sd, x_sl, g_sb, g_sd, g_sl, dx_sb, dx_sd, dx_sl,
                                 WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr):
    # A program walks TILES consecutive tiles of BLOCK_L tokens (small tiles keep the W x W shifted loads in
    # registers; several per program keep the dweight / dbias partial buffers small).
    offs_t, offs_d, batch, d_mask, x_base = _tile(x_ptr, x_sb, x_sd, channels, TILES * BLOCK_L, BLOCK_L, BLOCK_D)
    grad_base = grad_ptr + batch * g_sb + offs_d[None, :] * g_sd
    taps = tl.arange(0, WIDTH_PAD)
    dweight = tl.zeros((BLOCK_D, WIDTH_PAD), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    for tile in range(TILES):
        offs_l = offs_t + tile * BLOCK_L
        dx = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
        for j in tl.static_range(WIDTH):
            # g at the tokens l + j, which dx_l needs through weight[W - 1 - j]
            positions = offs_l + j
            p = _silu_preactivation(x_base, x_sl, weight_ptr, bias_ptr, positions, length, offs_d, d_mask, WIDTH,
                                    HAS_BIAS, BLOCK_L, BLOCK_D)
            s = tl.sigmoid(p)
            inside = (positions < length)[:, None] & d_mask[None, :]
            dout = tl.load(grad_base + positions[:, None] * g_sl, mask=inside, other=0.0).to(tl.float32)
            g = dout * s * (1.0 + p * (1.0 - s))
            w = tl.load(weight_ptr + offs_d * WIDTH + (WIDTH - 1 - j), mask=d_mask, other=0.0).to(tl.float32)
            dx += g * w[None, :]
            if j == 0:  # the tile's own tokens: their share of dweight and dbias
                dbias += tl.sum(g, axis=0)
                for k in tl.static_range(WIDTH):
                    source = offs_l - (WIDTH - 1) + k
                    valid = (source >= 0) & (source < length)
                    x = tl.load(x_base + source[:, None] * x_sl, mask=valid[:, None] & d_mask[None, :], other=0.0)
                    tap_sum = tl.sum(x.to(tl.float32) * g, axis=0)
                    dweight += tl.where(taps[None, :] == k, tap_sum[:, None], 0.0)
        tl.store(dx_ptr + batch * dx_sb + offs_l[:, None] * dx_sl + offs_d[None, :] * dx_sd,
                 dx.to(dx_ptr.dtype.element_ty), mask=(offs_l < length)[:, None] & d_mask[None, :])
    part = (batch * tl.num_programs(0) + tl.program_id(0)) * channels + offs_d
    tl.store(dweight_part_ptr + part[:, None] * WIDTH + taps[None, :], dweight,
             mask=d_mask[:, None] & (taps[None, :] < WIDTH))
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part, dbias, mask=d_mask)


def empty_token_major(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Return an empty (B, D, L) tensor of x's dtype (or ``dtype``) stored token-major ((B, L, D) contiguous)."""
    batch, channels, length = x.shape
    return torch.empty(batch, length, channels, device=x.device, dtype=dtype or x.dtype).transpose(1, 2)


def _grid(x: torch.Tensor, tokens_per_program: int):
    batch, channels, length = x.shape
    return triton.cdiv(length, tokens_per_program), triton.cdiv(channels, BLOCK_D), batch


class CausalConv1dSiLU(torch.autograd.Function):
    """SiLU(causal depthwise conv1d(x)) for x (B, D, L) of any strides; saves only its inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        weight = weight.contiguous()
        out = empty_token_major(x)
        bias_arg = weight if bias is None else bias.contiguous()  # any pointer: HAS_BIAS=False never reads it
        _causal_conv_forward_kernel[_grid(x, BLOCK_L)](
            x, weight, bias_arg, out, x.shape[2], x.shape[1], *x.stride(), *out.stride(),
            WIDTH=weight.shape[1], HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        grid = _grid(x, BACKWARD_BLOCK_L * BACKWARD_TILES)
        batch_programs = grid[0] * grid[2]
        channels, width = weight.shape
        dx = empty_token_major(x)
        dweight_part = torch.empty(batch_programs, channels, width, device=x.device, dtype=torch.float32)
        dbias_part = (torch.empty(batch_programs, channels, device=x.device, dtype=torch.float32)
                      if bias is not None else dweight_part)
        bias_arg = weight if bias is None else bias
        _causal_conv_backward_kernel[grid](
            x, weight, bias_arg, grad_out, dx, dweight_part, dbias_part, x.shape[2], channels, *x.stride(),
            *grad_out.stride(), *dx.stride(), WIDTH=width, WIDTH_PAD=triton.next_power_of_2(width),
            HAS_BIAS=bias is not None, BLOCK_L=BACKWARD_BLOCK_L, BLOCK_D=BLOCK_D, TILES=BACKWARD_TILES)
        dweight = dweight_part.sum(0).to(weight.dtype)
        dbias = dbias_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dweight, dbias


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       activation: str = "silu") -> torch.Tensor:
    """Return SiLU(causal depthwise conv1d(x)) (B, D, L), stored token-major; ``causal_conv1d_fn``'s arguments
    (``weight`` (D, W); the activation must be SiLU, the only one the Mamba layer uses)."""
    assert activation == "silu", f"only the SiLU activation is implemented, got {activation!r}"
    assert x.dim() == 3 and weight.dim() == 2 and weight.shape[0] == x.shape[1], (
        f"expected x (B, D, L) and weight (D, W); got {tuple(x.shape)} and {tuple(weight.shape)}")
    return CausalConv1dSiLU.apply(x, weight, bias)
