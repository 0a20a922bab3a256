"""Instance normalisation in Triton, forward and backward: statistics split over many programs per (batch, channel).

Math, per row r = (batch b, channel c) of M = prod(spatial) elements (``F.instance_norm`` without running stats):

    mean_r = sum_i x_ri / M,  var_r = sum_i (x_ri - mean_r)^2 / M,  rstd_r = 1 / sqrt(var_r + eps)
    xhat   = (x - mean_r) rstd_r,  y = weight_c xhat + bias_c

Backward, with g = weight_c dy:

    dx = rstd_r (g - sum_i g_ri / M - xhat sum_i g_ri xhat_ri / M)
    dweight_c = sum_{b, i} dy xhat,  dbias_c = sum_{b, i} dy

Why a kernel of our own: torch runs instance norm as cuDNN batch norm over a (1, B * C, ...) view, whose kernels
reduce each row in one block, so a 3D stage-0 map (2 x 32 rows of 128^3 voxels) fills 64 blocks of a 132-SM GPU and
walks 2 million voxels per block: in the U-Mamba-Enc training step at the 128^3 plan its forward and backward
kernels took 47 of 246 ms on the H200 (BENCHMARKS.md, 2026-12-02 sixth session). Here every row is split over up to
``MAX_SPLITS`` programs; the statistics are merged with Chan et al.'s pairwise update (mean and M2, not sums of
squares, so a large mean does not cancel the variance), per lane inside a program and across lanes and programs
after. Arithmetic is fp32; y and dx take x's dtype, dweight and dbias the parameters'. The forward keeps x and the
per-row mean / rstd (what torch's keeps too); the backward recomputes xhat.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per tile (4 warps: 16 per thread, 32 bytes of bf16 per load)
WARPS = 4
TARGET_ELEMENTS = 32768  # per program: rows of 2 million voxels get 64 programs
MAX_SPLITS = 256


@triton.jit
def _span(split, per_program, M):
    """Return (first, end) of the elements of a row that program ``split`` covers."""
    begin = split * per_program
    return begin, tl.minimum(begin + per_program, M)


@triton.jit
def _load_row(ptr, row, M, offs, inside):
    """Load elements ``offs`` of row ``row`` of a contiguous (rows, M) tensor as fp32."""
    return tl.load(ptr + row * M + offs, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub & LeVeque 1979)."""
    count = count_a + count_b
    safe = tl.where(count > 0, count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


@triton.jit
def _welford_step(count, mean, m2, x, inside):
    """Add x to per-lane Welford summaries (count, mean, M2) where ``inside``: every lane adds at most one element
    per tile."""
    count_new = count + tl.where(inside, 1.0, 0.0)
    delta = tl.where(inside, x - mean, 0.0)
    mean += delta / tl.where(count_new > 0, count_new, 1.0)
    m2 += delta * tl.where(inside, x - mean, 0.0)
    return count_new, mean, m2


@triton.jit
def _instance_norm_stats_kernel(x_ptr, partial_ptr, M, per_program, n_splits, BLOCK: tl.constexpr):
    """(count, mean, M2) of elements [split * per_program, +per_program) of row r: partial (rows, splits, 3)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK):
        offs = start + lanes
        inside = offs < end
        x = _load_row(x_ptr, row, M, offs, inside)
        count, mean, m2 = _welford_step(count, mean, m2, x, inside)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    out = partial_ptr + (row * n_splits + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _row_stats(partial_ptr, row, n_splits, eps, SPLITS_PAD: tl.constexpr):
    """Return (mean, rstd) of a row from its programs' partial summaries."""
    index = tl.arange(0, SPLITS_PAD)
    mask = index < n_splits
    base = partial_ptr + (row * n_splits + index) * 3
    count = tl.load(base, mask=mask, other=0.0)
    mean = tl.load(base + 1, mask=mask, other=0.0)
    m2 = tl.load(base + 2, mask=mask, other=0.0)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    return mean, 1.0 / tl.sqrt(m2 / count + eps)


@triton.jit
def _instance_norm_apply_kernel(x_ptr, partial_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, M, C,
                                per_program, n_splits, eps, SPLITS_PAD: tl.constexpr, BLOCK: tl.constexpr,
                                AFFINE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    mean, rstd = _row_stats(partial_ptr, row, n_splits, eps, SPLITS_PAD)
    if split == 0:
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
    scale = rstd
    shift = -mean * rstd
    if AFFINE:
        channel = row % C
        w = tl.load(weight_ptr + channel).to(tl.float32)
        scale = w * rstd
        shift = tl.load(bias_ptr + channel).to(tl.float32) - mean * scale
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        x = _load_row(x_ptr, row, M, offs, inside)
        tl.store(y_ptr + row * M + offs, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _instance_norm_grad_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, partial_ptr, M, per_program, n_splits,
                                    BLOCK: tl.constexpr):
    """(sum dy, sum dy xhat) of a program's elements: partial (rows, splits, 2)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    sum_dy = tl.zeros([BLOCK], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK], dtype=tl.float32)
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        x = _load_row(x_ptr, row, M, offs, inside)
        dy = _load_row(dy_ptr, row, M, offs, inside)
        sum_dy += dy
        sum_dy_xhat += dy * (x - mean) * rstd
    out = partial_ptr + (row * n_splits + split) * 2
    tl.store(out, tl.sum(sum_dy, axis=0))
    tl.store(out + 1, tl.sum(sum_dy_xhat, axis=0))


@triton.jit
def _instance_norm_grad_input_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, partial_ptr, weight_ptr, dx_ptr, M, C,
                                     per_program, n_splits, SPLITS_PAD: tl.constexpr, BLOCK: tl.constexpr,
                                     AFFINE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    index = tl.arange(0, SPLITS_PAD)
    mask = index < n_splits
    base = partial_ptr + (row * n_splits + index) * 2
    w = 1.0
    if AFFINE:
        w = tl.load(weight_ptr + row % C).to(tl.float32)
    mean_g = w * tl.sum(tl.load(base, mask=mask, other=0.0), axis=0) / M
    mean_g_xhat = w * tl.sum(tl.load(base + 1, mask=mask, other=0.0), axis=0) / M
    begin, end = _span(split, per_program, M)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        x = _load_row(x_ptr, row, M, offs, inside)
        dy = _load_row(dy_ptr, row, M, offs, inside)
        xhat = (x - mean) * rstd
        dx = rstd * (w * dy - mean_g - xhat * mean_g_xhat)
        tl.store(dx_ptr + row * M + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _geometry(M: int):
    """Return (elements per program (a multiple of BLOCK), programs per row)."""
    splits = max(1, min(MAX_SPLITS, triton.cdiv(M, TARGET_ELEMENTS)))
    per_program = triton.cdiv(triton.cdiv(M, splits), BLOCK) * BLOCK
    return per_program, triton.cdiv(M, per_program)


class InstanceNormTriton(torch.autograd.Function):
    """``F.instance_norm(x, weight=weight, bias=bias, eps=eps)`` for a contiguous (B, C, *spatial) x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
        batch, channels = x.shape[:2]
        rows, M = batch * channels, x[0, 0].numel()
        per_program, splits = _geometry(M)
        grid = (rows, splits)
        partial = torch.empty(rows, splits, 3, device=x.device, dtype=torch.float32)
        _instance_norm_stats_kernel[grid](x, partial, M, per_program, splits, BLOCK=BLOCK, num_warps=WARPS)
        y = torch.empty_like(x)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        affine = weight is not None
        _instance_norm_apply_kernel[grid](x, partial, weight if affine else mean, bias if affine else mean, y, mean,
                                          rstd, M, channels, per_program, splits, eps,
                                          SPLITS_PAD=triton.next_power_of_2(splits), BLOCK=BLOCK, AFFINE=affine,
                                          num_warps=WARPS)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.geometry = (per_program, splits)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        per_program, splits = ctx.geometry
        dy = dy.contiguous()
        batch, channels = x.shape[:2]
        rows, M = batch * channels, x[0, 0].numel()
        grid = (rows, splits)
        partial = torch.empty(rows, splits, 2, device=x.device, dtype=torch.float32)
        _instance_norm_grad_sums_kernel[grid](x, dy, mean, rstd, partial, M, per_program, splits, BLOCK=BLOCK,
                                              num_warps=WARPS)
        dx = torch.empty_like(x)
        affine = weight is not None
        _instance_norm_grad_input_kernel[grid](x, dy, mean, rstd, partial, weight if affine else mean, dx, M,
                                               channels, per_program, splits,
                                               SPLITS_PAD=triton.next_power_of_2(splits), BLOCK=BLOCK, AFFINE=affine,
                                               num_warps=WARPS)
        dweight = dbias = None
        if affine:
            sums = partial.view(batch, channels, splits, 2).sum(dim=(0, 2))
            dweight, dbias = sums[:, 1].to(weight.dtype), sums[:, 0].to(weight.dtype)
        return dx, dweight, dbias, None
