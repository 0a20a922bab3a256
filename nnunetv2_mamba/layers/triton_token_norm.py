"""LayerNorm over the channels of a (B, C, L) feature map, written as (B, L, C) tokens: one Triton kernel each way.

Math, per token (b, l) of C channels (``F.layer_norm`` over the last axis of the tokens ``x.transpose(1, 2)``):

    mean = sum_c x_c / C,  var = sum_c (x_c - mean)^2 / C,  rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) rstd,  y = weight_c xhat + bias_c

Backward, with g = weight_c dy:

    dx = rstd (g - sum_c g_c / C - xhat sum_c g_c xhat_c / C)
    dweight_c = sum_{b, l} dy xhat,  dbias_c = sum_{b, l} dy

Why a kernel of our own: the Mamba layers normalise the tokens of a channel-major map. In torch that is a transposing
copy (layer_norm needs its normalised axis contiguous), the LayerNorm writing fp32 (autocast runs it in fp32) and
the first projection's cast of those fp32 tokens to bf16: three passes, the middle one 4 bytes per element; and
torch's LayerNorm kernels give each token of 32 channels (U-Mamba's stage 0) a warp of its own. Here a program reads
a (C, tokens) tile of the map, coalesced along the tokens, and writes the normalised (tokens, C) tile straight in the
dtype the projection reads (bf16 under the bf16 mixer policy: the value the cast would have given). The backward
reads the tokens' gradient and the map, writes dx in the map's layout (channel-major or channels last) and dtype,
and per-program partial sums of dweight and dbias (summed in torch). Arithmetic is fp32; the forward keeps x and the
per-token mean / rstd.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # channels x tokens per program: 128 tokens of 32 channels
MIN_TOKENS, MAX_TOKENS = 16, 128
MAX_CHANNELS = 1024  # a (C, 16) tile in registers; wider tokens use torch's LayerNorm


@triton.jit
def _tile(block, L, C, BLOCK_L: tl.constexpr, C_PAD: tl.constexpr):
    """Return program ``block``'s (channels (C_PAD, 1), tokens (1, BLOCK_L), mask) of a batch element's map."""
    channels = tl.arange(0, C_PAD)[:, None]
    tokens = block * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    return channels, tokens, (channels < C) & (tokens < L)


@triton.jit
def _token_norm_forward_kernel(x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, L, C, stride_xb, stride_xc,
                               stride_xl, eps, BLOCK_L: tl.constexpr, C_PAD: tl.constexpr, AFFINE: tl.constexpr):
    block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    channels, tokens, mask = _tile(block, L, C, BLOCK_L, C_PAD)
    x = tl.load(x_ptr + batch * stride_xb + channels * stride_xc + tokens * stride_xl, mask=mask,
                other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C  # (BLOCK_L,)
    centred = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    y = centred * rstd[None, :]
    if AFFINE:
        y = y * tl.load(weight_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)
        y += tl.load(bias_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)
    # (B, L, C) contiguous tokens: the compiler stages the tile through shared memory so that both sides coalesce
    tl.store(y_ptr + (batch * L + tokens) * C + channels, y.to(y_ptr.dtype.element_ty), mask=mask)
    stats = batch * L + block * BLOCK_L + tl.arange(0, BLOCK_L)
    inside = block * BLOCK_L + tl.arange(0, BLOCK_L) < L
    tl.store(mean_ptr + stats, mean, mask=inside)
    tl.store(rstd_ptr + stats, rstd, mask=inside)


@triton.jit
def _token_norm_backward_kernel(x_ptr, dy_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, L, C, stride_xb,
                                stride_xc, stride_xl, stride_dyb, stride_dyl, stride_dyc, stride_dxb, stride_dxc,
                                stride_dxl, n_blocks,
                                BLOCK_L: tl.constexpr, C_PAD: tl.constexpr, AFFINE: tl.constexpr):
    block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    channels, tokens, mask = _tile(block, L, C, BLOCK_L, C_PAD)
    x = tl.load(x_ptr + batch * stride_xb + channels * stride_xc + tokens * stride_xl, mask=mask,
                other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + batch * stride_dyb + tokens * stride_dyl + channels * stride_dyc, mask=mask,
                 other=0.0).to(tl.float32)
    inside = block * BLOCK_L + tl.arange(0, BLOCK_L) < L
    stats = batch * L + block * BLOCK_L + tl.arange(0, BLOCK_L)
    mean = tl.load(mean_ptr + stats, mask=inside, other=0.0)
    rstd = tl.load(rstd_ptr + stats, mask=inside, other=0.0)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    g = dy
    if AFFINE:
        g = dy * tl.load(weight_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)
    mean_g = tl.sum(g, axis=0) / C
    mean_g_xhat = tl.sum(g * xhat, axis=0) / C
    dx = rstd[None, :] * (g - mean_g[None, :] - xhat * mean_g_xhat[None, :])
    # dx has the map's layout (channel-major, or channels last: then (tokens, C) tiles are contiguous)
    tl.store(dx_ptr + batch * stride_dxb + channels * stride_dxc + tokens * stride_dxl, dx.to(dx_ptr.dtype.element_ty),
             mask=mask)
    if AFFINE:
        partial = partial_ptr + ((batch * n_blocks + block) * 2) * C + tl.arange(0, C_PAD)
        in_range = tl.arange(0, C_PAD) < C
        tl.store(partial, tl.sum(dy * xhat, axis=1), mask=in_range)
        tl.store(partial + C, tl.sum(dy, axis=1), mask=in_range)


def _geometry(channels: int):
    """Return (tokens per program, padded channels, warps)."""
    channels_pad = triton.next_power_of_2(channels)
    tokens = max(MIN_TOKENS, min(MAX_TOKENS, TILE_ELEMENTS // channels_pad))
    return tokens, channels_pad, 4 if channels_pad * tokens <= TILE_ELEMENTS else 8


class TokenLayerNormTriton(torch.autograd.Function):
    """``F.layer_norm(x.transpose(1, 2), (C,), weight, bias, eps).to(dtype)`` as contiguous (B, L, C) tokens, for a
    (B, C, L) map x of any strides."""

    max_channels = MAX_CHANNELS

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                dtype: torch.dtype):
        batch, channels, length = x.shape
        block_l, channels_pad, warps = _geometry(channels)
        grid = (triton.cdiv(length, block_l), batch)
        y = torch.empty(batch, length, channels, device=x.device, dtype=dtype)
        mean = torch.empty(batch, length, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        affine = weight is not None
        _token_norm_forward_kernel[grid](x, weight if affine else mean, bias if affine else mean, y, mean, rstd,
                                         length, channels, *x.stride(), eps, BLOCK_L=block_l, C_PAD=channels_pad,
                                         AFFINE=affine, num_warps=warps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        batch, channels, length = x.shape
        block_l, channels_pad, warps = _geometry(channels)
        n_blocks = triton.cdiv(length, block_l)
        affine = weight is not None
        dx = torch.empty_like(x)  # x's strides when they are dense (a channels-last map's), else contiguous
        partial = torch.empty(batch * n_blocks if affine else 1, 2, channels, device=x.device, dtype=torch.float32)
        _token_norm_backward_kernel[(n_blocks, batch)](x, dy, weight if affine else mean, mean, rstd, dx, partial,
                                                       length, channels, *x.stride(), *dy.stride(), *dx.stride(),
                                                       n_blocks, BLOCK_L=block_l, C_PAD=channels_pad, AFFINE=affine,
                                                       num_warps=warps)
        dweight = dbias = None
        if affine:
            sums = partial.sum(dim=0)
            dweight, dbias = sums[0].to(weight.dtype), sums[1].to(weight.dtype)
        return dx, dweight, dbias, None, None
