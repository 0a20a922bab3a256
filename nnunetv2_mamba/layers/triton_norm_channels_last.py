"""Instance normalisation in Triton for channels-last maps (memory (B, *spatial, C)), forward and backward.

The same maths as ``triton_norm.py`` (per (batch, channel) statistics over the M = prod(spatial) positions, Chan's
pairwise merge of (count, mean, M2), fp32 arithmetic), laid out for a map stored position-major: a program covers a
span of positions of one batch element and all of its channels, reading (positions, C) tiles that are contiguous in
memory, and keeps a summary per channel. Why channels last at all: cuDNN's fp16 3D convolutions run in NDHWC, and for
NCDHW tensors it converts every input and output (``nchwToNhwcKernel`` / ``nhwcToNchwKernel``: 22 of U-Mamba-Enc's 193
ms per training step at the 128^3 plan on the H200, BENCHMARKS.md 2026-12-03); a network kept channels last skips
them, and its norms must then read that layout without a transposing copy (torch's instance norm makes one).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nnunetv2_mamba.layers.memory_format import channels_last_format
from nnunetv2_mamba.layers.triton_norm import _chan_merge, _span, _welford_step

TILE_ELEMENTS = 2048  # positions x channels per tile (4 warps: 16 per thread)
WARPS = 4
TARGET_ELEMENTS = 65536  # per program
MAX_SPLITS = 256  # programs per batch element


@triton.jit
def _tile(x_ptr, batch, start, end, M, C, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr):
    """Return (x tile (BLOCK_M, C_PAD) as fp32, its offsets, its mask) of positions [start, start + BLOCK_M)."""
    rows = start + tl.arange(0, BLOCK_M)[:, None]
    channels = tl.arange(0, C_PAD)[None, :]
    mask = (rows < end) & (channels < C)
    offsets = (batch * M + rows) * C + channels
    return tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), offsets, mask


@triton.jit
def _norm_cl_stats_kernel(x_ptr, partial_ptr, M, C, per_program, n_splits, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr):
    """(count, mean, M2) per channel of a program's positions: partial (B, splits, 3, C)."""
    batch = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    count = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK_M):
        x, _, mask = _tile(x_ptr, batch, start, end, M, C, BLOCK_M, C_PAD)
        count, mean, m2 = _welford_step(count, mean, m2, x, mask)  # per (lane, channel)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    channels = tl.arange(0, C_PAD)
    out = partial_ptr + (batch * n_splits + split) * 3 * C + channels
    inside = channels < C
    tl.store(out, count, mask=inside)
    tl.store(out + C, mean, mask=inside)
    tl.store(out + 2 * C, m2, mask=inside)


@triton.jit
def _cl_partials(partial_ptr, batch, n_splits, C, fields: tl.constexpr, field: tl.constexpr,
                 SPLITS_PAD: tl.constexpr, C_PAD: tl.constexpr):
    """Load field ``field`` of every program's partial summary of batch element ``batch``: (SPLITS_PAD, C_PAD)."""
    splits = tl.arange(0, SPLITS_PAD)[:, None]
    channels = tl.arange(0, C_PAD)[None, :]
    mask = (splits < n_splits) & (channels < C)
    return tl.load(partial_ptr + ((batch * n_splits + splits) * fields + field) * C + channels, mask=mask, other=0.0)


@triton.jit
def _norm_cl_apply_kernel(x_ptr, partial_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, M, C, per_program,
                          n_splits, eps, SPLITS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr,
                          AFFINE: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    count, mean, m2 = tl.reduce((_cl_partials(partial_ptr, batch, n_splits, C, 3, 0, SPLITS_PAD, C_PAD),
                                 _cl_partials(partial_ptr, batch, n_splits, C, 3, 1, SPLITS_PAD, C_PAD),
                                 _cl_partials(partial_ptr, batch, n_splits, C, 3, 2, SPLITS_PAD, C_PAD)), 0,
                                _chan_merge)
    rstd = 1.0 / tl.sqrt(m2 / tl.where(count > 0, count, 1.0) + eps)
    channels = tl.arange(0, C_PAD)
    inside = channels < C
    if split == 0:
        tl.store(mean_ptr + batch * C + channels, mean, mask=inside)
        tl.store(rstd_ptr + batch * C + channels, rstd, mask=inside)
    scale = rstd
    shift = -mean * rstd
    if AFFINE:
        scale = tl.load(weight_ptr + channels, mask=inside, other=0.0).to(tl.float32) * rstd
        shift = tl.load(bias_ptr + channels, mask=inside, other=0.0).to(tl.float32) - mean * scale
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK_M):
        x, offsets, mask = _tile(x_ptr, batch, start, end, M, C, BLOCK_M, C_PAD)
        tl.store(y_ptr + offsets, (x * scale[None, :] + shift[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_saved_stats(mean_ptr, rstd_ptr, batch, C, C_PAD: tl.constexpr):
    """Return (channel offsets, their mask, mean, rstd) of batch element ``batch``, as the forward saved them."""
    channels = tl.arange(0, C_PAD)
    inside = channels < C
    mean = tl.load(mean_ptr + batch * C + channels, mask=inside, other=0.0)
    rstd = tl.load(rstd_ptr + batch * C + channels, mask=inside, other=0.0)
    return channels, inside, mean, rstd


@triton.jit
def _norm_cl_grad_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, partial_ptr, M, C, per_program, n_splits,
                              BLOCK_M: tl.constexpr, C_PAD: tl.constexpr):
    """(sum dy, sum dy xhat) per channel of a program's positions: partial (B, splits, 2, C)."""
    batch = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    channels, inside, mean, rstd = _cl_saved_stats(mean_ptr, rstd_ptr, batch, C, C_PAD)
    sum_dy = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK_M):
        x, offsets, mask = _tile(x_ptr, batch, start, end, M, C, BLOCK_M, C_PAD)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xhat += dy * (x - mean[None, :]) * rstd[None, :]
    out = partial_ptr + (batch * n_splits + split) * 2 * C + channels
    tl.store(out, tl.sum(sum_dy, axis=0), mask=inside)
    tl.store(out + C, tl.sum(sum_dy_xhat, axis=0), mask=inside)


@triton.jit
def _norm_cl_grad_input_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, partial_ptr, weight_ptr, dx_ptr, M, C, per_program,
                               n_splits, SPLITS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr,
                               AFFINE: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    channels, inside, mean, rstd = _cl_saved_stats(mean_ptr, rstd_ptr, batch, C, C_PAD)
    w = tl.full([C_PAD], 1.0, tl.float32)
    if AFFINE:
        w = tl.load(weight_ptr + channels, mask=inside, other=0.0).to(tl.float32)
    mean_g = w * tl.sum(_cl_partials(partial_ptr, batch, n_splits, C, 2, 0, SPLITS_PAD, C_PAD), axis=0) / M
    mean_g_xhat = w * tl.sum(_cl_partials(partial_ptr, batch, n_splits, C, 2, 1, SPLITS_PAD, C_PAD), axis=0) / M
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK_M):
        x, offsets, mask = _tile(x_ptr, batch, start, end, M, C, BLOCK_M, C_PAD)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = rstd[None, :] * (w[None, :] * dy - mean_g[None, :] - xhat * mean_g_xhat[None, :])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(M: int, C: int):
    """Return (positions per tile, padded channels, positions per program (a multiple of the tile), programs per
    batch element)."""
    channels_pad = triton.next_power_of_2(C)
    block_m = max(1, TILE_ELEMENTS // channels_pad)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(M * C, TARGET_ELEMENTS)))
    per_program = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return block_m, channels_pad, per_program, triton.cdiv(M, per_program)


class InstanceNormChannelsLastTriton(torch.autograd.Function):
    """``F.instance_norm(x, weight=weight, bias=bias, eps=eps)`` for a channels-last (B, C, *spatial) x; y and dx are
    channels last too."""

    max_channels = 1024  # a (1, C) tile per program at least

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
        batch, channels = x.shape[:2]
        M = x[0, 0].numel()
        block_m, channels_pad, per_program, splits = _geometry(M, channels)
        grid = (batch, splits)
        partial = torch.empty(batch, splits, 3, channels, device=x.device, dtype=torch.float32)
        _norm_cl_stats_kernel[grid](x, partial, M, channels, per_program, splits, BLOCK_M=block_m, C_PAD=channels_pad,
                               num_warps=WARPS)
        y = torch.empty_like(x)  # keeps x's channels-last strides
        mean = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        affine = weight is not None
        _norm_cl_apply_kernel[grid](x, partial, weight if affine else mean, bias if affine else mean, y, mean, rstd, M,
                               channels, per_program, splits, eps, SPLITS_PAD=triton.next_power_of_2(splits),
                               BLOCK_M=block_m, C_PAD=channels_pad, AFFINE=affine, num_warps=WARPS)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous(memory_format=channels_last_format(x))  # a no-op when autograd hands it channels last
        batch, channels = x.shape[:2]
        M = x[0, 0].numel()
        block_m, channels_pad, per_program, splits = _geometry(M, channels)
        grid = (batch, splits)
        partial = torch.empty(batch, splits, 2, channels, device=x.device, dtype=torch.float32)
        _norm_cl_grad_sums_kernel[grid](x, dy, mean, rstd, partial, M, channels, per_program, splits, BLOCK_M=block_m,
                                   C_PAD=channels_pad, num_warps=WARPS)
        dx = torch.empty_like(x)
        affine = weight is not None
        _norm_cl_grad_input_kernel[grid](x, dy, mean, rstd, partial, weight if affine else mean, dx, M, channels,
                                    per_program, splits, SPLITS_PAD=triton.next_power_of_2(splits), BLOCK_M=block_m,
                                    C_PAD=channels_pad, AFFINE=affine, num_warps=WARPS)
        dweight = dbias = None
        if affine:
            sums = partial.sum(dim=(0, 1))
            dweight, dbias = sums[1].to(weight.dtype), sums[0].to(weight.dtype)
        return dx, dweight, dbias, None
