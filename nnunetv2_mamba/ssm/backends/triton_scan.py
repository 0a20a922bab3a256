"""Sequence-parallel selective scan in Triton: forward and backward kernels plus the autograd Function.

Math (mamba_ssm ``selective_scan_fn`` semantics), per batch b, channel d and state n:

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = a_t * h_{t-1} + delta_t * B_t * u_t,       a_t = exp(delta_t * A)
    y_t     = sum_n C_t * h_t + D * u_t
    out_t   = y_t * silu(z_t)                              (if z is given)

The sequence is cut into chunks of T tokens and the chunks into segments of S chunks (T = 16, S = 8). Every
segment (or, in the gradient kernel, every chunk) of every (batch, channel block) is a program of its own, so a
2-million-token sequence with 64 channels keeps the whole GPU busy (one block per channel that walks the
sequence would fill only batch x channels multiprocessors); a segment's program walks its chunks one after the
other with the state in registers, so only per-segment states go through memory. Forward, three launches:

1. ``_segment_end_state_kernel``: each segment's end state from a zero start, and its summed delta (the
   segment's total decay is exp(A * sum delta), so only the sum is stored).
2. the carry (``_carry``): the states entering the segments, H_{s+1} = exp(A sum_s delta) H_s + E_s, solved with
   ``tl.associative_scan`` over tiles of segments and a carry between tiles, in two levels for long sequences
   (superblocks of segments in parallel from zero, a carry over the superblocks, a fix-up adding it back).
3. ``_segment_output_kernel``: each chunk rescanned from its entering state (associative scan over the tokens of
   a (T, d_state, channels) tile), y with the D skip and the z gate fused, written in u's dtype.

The forward keeps nothing but the inputs (mamba_ssm keeps its output too). Backward, four launches, the middle
two with the same structure run against time:

1. the end-state kernel again, which now also writes each chunk's entering state counted from its segment's
   start and the delta summed before it in the segment ((batch, chunks, N, D) fp32: as large as an fp32 copy of
   u at T = N = 16; alive during the backward only), then the carry.
2. ``_segment_adjoint_kernel``: the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} of each segment from a zero end,
   reduced to what the segment passes to the one before it: Q_s = sum_t exp(A * sum_{s<=t} delta_s) C_t dy_t,
   walking its chunks from the last; per chunk the same from the segment's end, like the end-state kernel's.
3. the carry again, walking the segments backwards (negative stride).
4. ``_chunk_grad_kernel``, one program per chunk: entering state = its part from inside the segment +
   exp(A * delta before it) * the segment's entering state, the adjoint carry likewise; states rescanned forwards
   and adjoints backwards inside the chunk, then all the gradients. a_t h_{t-1} = h_t - delta_t B_t u_t gives the
   previous state without a division.

exp is computed as exp2 with A pre-multiplied by log2(e). All arithmetic is fp32 whatever the input dtype.
Reductions over tokens (dA, dD, d delta_bias, time-invariant dB/dC) go to per-(batch, chunk) partial
buffers summed by torch; the B/C gradients of shared/grouped B/C are summed over a program's channels in
registers and written once, with fp32 atomics only when a group's channels are split over several programs.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from nnunetv2_mamba.ssm.backends.triton_conv import empty_token_major

LOG2E = math.log2(math.e)
LN2 = tl.constexpr(math.log(2.0))  # read inside the kernels

# Tiling by d_state (padded to a power of two): (tokens per chunk, channels per tile, warps of the segment kernels,
# warps of the gradient kernel). Every kernel holds (T, N, BLOCK_D) fp32 tiles in registers, the gradient kernel
# several: with one warp it spills 1216 / 4088 bytes per thread at N = 32 / 64 (ptxas for sm_90,
# benchmarks/triton_registers.py). More warps spread its tiles: at 2 x 128^3 tokens x 64 channels, N = 32, its time
# went from 60.4 to 50.4 ms with two warps (82.5 with four), at 2 x 64^3 x 128, N = 64, from 71.2 to 27.5 ms with
# four (47.2 with eight); at N = 16 two warps doubled it. The same warps slowed the output kernel 1.7x / 2.7x, so the
# warps are set per kernel. Fewer tokens per chunk spill less too, but grow the backward's per-chunk state buffers
# (L / T x N x D fp32): +6.8 GiB at T = 8, N = 32 (BENCHMARKS.md, 2026-12-03 ninth session).
# NNUNETV2_MAMBA_TRITON_TILING="T:BLOCK_D:WARPS[:GRAD_WARPS]" forces one tiling for every d_state (measurements)
# and NNUNETV2_MAMBA_TRITON_CHUNK the chunk alone (tests use it to get many chunks out of short sequences);
# explicit arguments of selective_scan_triton win over both.
TILINGS = {16: (16, 4, 1, 1), 32: (16, 4, 1, 2), 64: (16, 4, 1, 4)}
# Chunks per segment: the end-state, output and adjoint kernels walk the chunks of one segment in one program,
# the state carried in registers, so the state buffers between the launches and the carry are per segment (1/8
# of the chunks). Per chunk (16 tokens, 16 states) a state buffer is as large as an fp32 copy of u: at one chunk
# per program the carry's two levels read and wrote ~6 GB of them per forward + backward at 2 x 128^3 x 64 and
# took 9.6 of the scan's 40 ms. NNUNETV2_MAMBA_TRITON_SEGMENT forces it (tests use 2; 1 is the old design).
CHUNKS_PER_SEGMENT = 8
# The carry over segments: tiles of CARRY_CHUNKS segments x all states x CARRY_LANE_D channels on one warp. Long
# sequences use two levels: superblocks of segments scanned in parallel from zero, their entering states carried
# over the (about CARRY_SUPERBLOCKS) superblocks, then added back, so no program walks all the segments.
# NNUNETV2_MAMBA_TRITON_CARRY="chunks,superblock" fixes both (tests use tiny ones); the superblock must be a
# multiple of the chunks per tile (the carry kernels call whatever they carry over "chunks").
CARRY_CHUNKS = 8
CARRY_LANE_D = 8
CARRY_SUPERBLOCKS = 128
FORCED_SUPERBLOCK = None
if os.environ.get("NNUNETV2_MAMBA_TRITON_CARRY"):
    CARRY_CHUNKS, FORCED_SUPERBLOCK = (int(v) for v in os.environ["NNUNETV2_MAMBA_TRITON_CARRY"].split(","))
# Programs below which the channels of a group are split over several programs (atomics for dB/dC).
MIN_PROGRAMS = 1024


@triton.jit
def _first_order_combine(a_left, b_left, a_right, b_right):
    # (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _reverse_scan(decay, drive):
    """``tl.associative_scan(..., reverse=True)`` over the tokens (axis 0) as flip, forward scan, flip.

    Same result; with the tokens inside each thread the flips are register renames, while Triton lowers the
    reverse scan with five levels of warp shuffles per value (640 shuffles per (16, 16, 4) tile on sm_90, 60 % of
    the gradient kernel's; benchmarks/triton_registers.py --sass)."""
    decay_run, state = tl.associative_scan((tl.flip(decay, 0), tl.flip(drive, 0)), 0, _first_order_combine)
    return tl.flip(decay_run, 0), tl.flip(state, 0)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _token_offsets(s_b, s_d, s_l, b, d, t):
    """Offsets of the (T, BLOCK_D) tile of a (batch, channels, length) tensor read through its strides."""
    return b * s_b + t[:, None] * s_l + d[None, :].to(tl.int64) * s_d  # int64: D * L may exceed 2**31


@triton.jit
def _load_tokens(ptr, s_b, s_d, s_l, b, d, t, mask):
    """Load a (T, BLOCK_D) tile of a (batch, channels, length) tensor read through its strides, as fp32."""
    return tl.load(ptr + _token_offsets(s_b, s_d, s_l, b, d, t), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_delta(dt_ptr, s_b, s_d, s_l, bias_ptr, b, d, t, d_mask, mask,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Return (delta after bias and softplus, delta before softplus); 0 on masked tokens (no decay, no drive)."""
    # Loaded as a (T, BLOCK_D, 1) tile and summed over its unit axis: the sum is a no-op, but it stops Triton's
    # layout pass from moving the conversion to the (T, N, BLOCK_D) tiles' layout up to the bf16/fp16 load and
    # recomputing bias + softplus there on each thread's 16 replicated copies (sm_90, Triton 3.6: end-state kernel
    # 1224 -> 632 instructions in bf16, gradient kernel 3576 -> 2528; fp32 inputs were not affected).
    offs = _token_offsets(s_b, s_d, s_l, b, d, t)[:, :, None]
    raw = tl.sum(tl.load(dt_ptr + offs, mask=mask[:, :, None], other=0.0).to(tl.float32), axis=2)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _load_bc(ptr, s0, s1, s2, s3, b, group, d, n, t, d_mask, n_mask, t_mask, VARIABLE: tl.constexpr):
    """Return B or C as a tile broadcastable to (T, N, BLOCK_D): (T, N, 1) if variable, else (1, N, BLOCK_D).

    Variable: element (b, group, n, t) at b*s0 + group*s1 + n*s2 + t*s3. Time-invariant: (d, n) at d*s0 + n*s1.
    """
    if VARIABLE:
        offs = b * s0 + group.to(tl.int64) * s1 + t[:, None] * s3 + n[None, :] * s2
        tile = tl.load(ptr + offs, mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        return tile[:, :, None]
    else:
        offs = d[None, :] * s0 + n[:, None] * s1
        tile = tl.load(ptr + offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        return tile[None, :, :]


@triton.jit
def _program(N: tl.constexpr, N_PAD: tl.constexpr):
    """Return (chunk or segment index, batch b, channel split, state lanes n, n_mask) of this program."""
    n = tl.arange(0, N_PAD)
    return tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2), n, n < N


@triton.jit
def _chunk_tokens(chunk, L, T: tl.constexpr):
    """Return (tokens t, t_mask) of a chunk."""
    t = chunk.to(tl.int64) * T + tl.arange(0, T)
    return t, t < L


@triton.jit
def _channel_block(split, block, blocks_per_program, D, n_mask, BLOCK_D: tl.constexpr):
    """Return (d_start, channels d, d_mask, (N, BLOCK_D) state mask) of a channel block."""
    d_start = (split * blocks_per_program + block) * BLOCK_D
    d = d_start + tl.arange(0, BLOCK_D)
    d_mask = d < D
    return d_start, d, d_mask, n_mask[:, None] & d_mask[None, :]


@triton.jit
def _last_token(x, T: tl.constexpr):
    """Row T - 1 of a (T, N, BLOCK_D) tile (an in-thread select: the tokens of a lane lie in one thread)."""
    return tl.sum(tl.where((tl.arange(0, T) == T - 1)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _state_offsets(row_start, d, n, D, N: tl.constexpr):
    """Offsets of the (N, BLOCK_D) tile of channels d in a (rows, N, D)-contiguous state buffer whose row starts at
    element ``row_start`` * N (row_start = row * D); 0 for A * log2(e), stored transposed as an (N, D) matrix."""
    return row_start * N + n[:, None] * D + d[None, :]


# Tiles are (T, N, BLOCK_D): tokens first, channels last. Triton's default layout spreads the last axis over the
# threads first, then the states, and repeats the rest inside each thread, so a thread holds all T tokens of its
# lanes (the scans along the tokens run inside it, no shuffles) and, at BLOCK_D = 4 and N = 16 on one warp, two
# states of one channel: a sum over the states is one add in the thread and three shuffle levels instead of four
# (channels-before-states put 16 threads on the states). Compiled for sm_90 (benchmarks/triton_registers.py
# --sass): the output kernel's shuffles 144 -> 52 per channel block, its instructions 1200 -> 1016.


# The segment kernels walk a segment chunk by chunk and, inside each chunk, its channel blocks, the way the chunk
# kernels did, so that the 16 channel blocks of a chunk read the same cache lines one after the other (token-major
# tensors hold 4 channels = 8 bytes of bf16 per token and block). Walking a channel block over the whole segment
# first touched 8x as many lines between reuses, more than L1 holds: the kernels ran 2-3x slower (H200, 2026-12-02
# sixth session). Each block's running state therefore lives in global memory between chunks, in the buffer the
# kernel writes at the end anyway (end states, entering states, adjoints): 256 bytes per block, L1-resident.


@triton.jit
def _running_state(state_ptr, run_ptr, segment_row, d, n, D, N: tl.constexpr, nd_mask, d_mask, started):
    """Return (pointers, state, delta sum) of a channel block's running values in a segment kernel, read from the
    (batch, segments, N, D) / (.., D) buffers that hold them between chunks; zero while not ``started``."""
    ptrs = state_ptr + _state_offsets(segment_row, d, n, D, N)
    return (ptrs, tl.load(ptrs, mask=nd_mask & started, other=0.0),
            tl.load(run_ptr + segment_row + d, mask=d_mask & started, other=0.0))


@triton.jit
def _store_chunk_part(local_ptr, dt_part_ptr, row, d, n, D, N: tl.constexpr, state, dt_run, nd_mask, d_mask):
    """Store a chunk's part from inside its segment (state, delta sum) at row ``row`` = chunk row * D."""
    tl.store(local_ptr + _state_offsets(row, d, n, D, N), state, mask=nd_mask)
    tl.store(dt_part_ptr + row + d, dt_run, mask=d_mask)


@triton.jit
def _chunk_entering(local_ptr, dt_part_ptr, segment_ptr, local_row, segment_row, A2, d, n, D, N: tl.constexpr,
                    d_mask, nd_mask):
    """Return a chunk's state (or adjoint carry) at its edge: its part from inside the segment plus the segment's,
    decayed by exp2(A * the delta summed between the chunk and the segment's edge)."""
    dt_part = tl.load(dt_part_ptr + local_row + d, mask=d_mask, other=0.0)
    return (tl.load(local_ptr + _state_offsets(local_row, d, n, D, N), mask=nd_mask, other=0.0)
            + tl.exp2(A2 * dt_part[None, :])
            * tl.load(segment_ptr + _state_offsets(segment_row, d, n, D, N), mask=nd_mask, other=0.0))


@triton.jit
def _segment_end_state_kernel(
        u_ptr, su_b, su_d, su_l, dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, A2_ptr,
        B_ptr, sB0, sB1, sB2, sB3,
        end_ptr, dtsum_ptr, local_ptr, prefix_ptr,
        D, L, n_segments, chunks_per_segment, channels_per_group, blocks_per_program,
        N: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr,
        B_VARIABLE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, WRITE_LOCAL: tl.constexpr):
    """Each segment's end state from a zero start and its summed delta, (batch, segments, N, D) / (.., D).

    WRITE_LOCAL (the backward): also each chunk's entering state counted from its segment's start, and the delta
    summed over the segment before it, (batch, padded chunks, N, D) / (.., D): the gradient kernel's chunk states.
    """
    seg, b, split, n, n_mask = _program(N, N_PAD)
    padded_chunks = n_segments * chunks_per_segment
    segment_row = (b * n_segments + seg) * D
    for i in range(chunks_per_segment):
        chunk = seg * chunks_per_segment + i
        t, t_mask = _chunk_tokens(chunk, L, T)
        for block in range(blocks_per_program):
            d_start, d, d_mask, nd_mask = _channel_block(split, block, blocks_per_program, D, n_mask, BLOCK_D)
            state_ptrs, state, dt_run = _running_state(end_ptr, dtsum_ptr, segment_row, d, n, D, N, nd_mask, d_mask,
                                                       i > 0)
            if WRITE_LOCAL:
                _store_chunk_part(local_ptr, prefix_ptr, (b * padded_chunks + chunk) * D, d, n, D, N, state, dt_run,
                                  nd_mask, d_mask)
            mask = t_mask[:, None] & d_mask[None, :]
            A2 = tl.load(A2_ptr + _state_offsets(0, d, n, D, N), mask=nd_mask, other=0.0)
            u = _load_tokens(u_ptr, su_b, su_d, su_l, b, d, t, mask)
            dt, _ = _load_delta(dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, b, d, t, d_mask, mask, HAS_BIAS, SOFTPLUS)
            Bt = _load_bc(B_ptr, sB0, sB1, sB2, sB3, b, d_start // channels_per_group, d, n, t, d_mask, n_mask,
                          t_mask, B_VARIABLE)
            decay_run, h = tl.associative_scan((tl.exp2(A2[None, :, :] * dt[:, None, :]),
                                                (dt * u)[:, None, :] * Bt), 0, _first_order_combine)
            # masked tokens: decay 1, drive 0, the state passes unchanged
            tl.store(state_ptrs, _last_token(decay_run, T) * state + _last_token(h, T), mask=nd_mask)
            tl.store(dtsum_ptr + segment_row + d, dt_run + tl.sum(dt, axis=0), mask=d_mask)
        tl.debug_barrier()  # the next chunk's loads of the running states see these stores


@triton.jit
def _carry_lanes(D, N: tl.constexpr, N_PAD: tl.constexpr, LANE_D: tl.constexpr):
    """Return (channel, offset n * D + d, mask) of the N_PAD * LANE_D lanes (state n, channel d) of this program."""
    index = tl.arange(0, N_PAD * LANE_D)
    n = index // LANE_D
    d = tl.program_id(0) * LANE_D + index % LANE_D
    return d, n * D + d, (n < N) & (d < D)


@triton.jit
def _carry_rows(local_ptr, dtsum_ptr, b, K, D, j, first_in, step_in, d, lane, lane_mask, lanes_total):
    """Load the (CHUNKS, lanes) local states and delta sums of logical chunks j."""
    row = b * K + (first_in + j * step_in).to(tl.int64)
    mask = (j < K)[:, None] & lane_mask[None, :]
    local = tl.load(local_ptr + row[:, None] * lanes_total + lane[None, :], mask=mask, other=0.0)
    dtsum = tl.load(dtsum_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0)
    return local, dtsum, mask


# The carry kernels walk chunks in (CHUNKS, lanes) tiles, a lane being a (state, channel) pair; the lanes fill the
# warp and the chunks stay inside each thread, so the scans over chunks need no shuffles (a tile of 16 lanes x 256
# chunks on 4 warps, the first version, spread the chunks over the threads: 484 shuffles per tile, 2.6 ms per carry
# level at 2 x 128^3 x 64). States are (batch, chunk, N, D), channels contiguous. Chunks are logical: physical
# index first + j * step (the backward walks them from the end).


@triton.jit
def _chunk_carry_kernel(local_ptr, dtsum_ptr, A2_ptr, out_ptr, K, D, first_in, step_in, first_out, step_out,
                        N: tl.constexpr, N_PAD: tl.constexpr, LANE_D: tl.constexpr, CHUNKS: tl.constexpr):
    """out[j + 1] = exp2(A2 * dtsum[j]) * out[j] + local[j] over chunks j; out's first slot gets 0.

    local: (batch, K, N, D); dtsum: (batch, K, D); A2: (N, D); out: (batch, K + 1, N, D).
    """
    d, lane, lane_mask = _carry_lanes(D, N, N_PAD, LANE_D)
    b = tl.program_id(1).to(tl.int64)
    lanes_total = D * N
    A2 = tl.load(A2_ptr + lane, mask=lane_mask, other=0.0)
    carry = tl.zeros([N_PAD * LANE_D], dtype=tl.float32)
    out_base = out_ptr + b * (K + 1) * lanes_total
    tl.store(out_base + first_out * lanes_total + lane, carry, mask=lane_mask)
    rows = tl.arange(0, CHUNKS)
    for j0 in range(0, K, CHUNKS):
        j = j0 + rows
        local, dtsum, mask = _carry_rows(local_ptr, dtsum_ptr, b, K, D, j, first_in, step_in, d, lane, lane_mask,
                                         lanes_total)
        # masked chunks: decay 1, local 0, the state passes unchanged
        decay_run, state = tl.associative_scan((tl.exp2(dtsum * A2[None, :]), local), 0, _first_order_combine)
        state = state + decay_run * carry[None, :]
        k_out = (first_out + (j + 1) * step_out).to(tl.int64)
        tl.store(out_base + k_out[:, None] * lanes_total + lane[None, :], state, mask=mask)
        carry = tl.sum(tl.where((rows == CHUNKS - 1)[:, None], state, 0.0), axis=0)


@triton.jit
def _carry_local_kernel(local_ptr, dtsum_ptr, A2_ptr, out_ptr, super_end_ptr, super_dt_ptr, K, D,
                        first_in, step_in, first_out, step_out, SUPER,
                        N: tl.constexpr, N_PAD: tl.constexpr, LANE_D: tl.constexpr, CHUNKS: tl.constexpr):
    """Level 1 of the carry: the states after each chunk of superblock s, from a zero state at its start.

    Writes them to out like _chunk_carry_kernel, and the superblock's end state and summed delta (per lane)
    to super_end / super_dt (batch, n_super, N, D).
    """
    d, lane, lane_mask = _carry_lanes(D, N, N_PAD, LANE_D)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    n_super = tl.num_programs(2)
    lanes_total = D * N
    A2 = tl.load(A2_ptr + lane, mask=lane_mask, other=0.0)
    carry = tl.zeros([N_PAD * LANE_D], dtype=tl.float32)
    dt_total = tl.zeros([N_PAD * LANE_D], dtype=tl.float32)
    out_base = out_ptr + b * (K + 1) * lanes_total
    if s == 0:
        tl.store(out_base + first_out * lanes_total + lane, carry, mask=lane_mask)
    rows = tl.arange(0, CHUNKS)
    for j0 in range(s * SUPER, s * SUPER + SUPER, CHUNKS):
        j = j0 + rows
        local, dtsum, mask = _carry_rows(local_ptr, dtsum_ptr, b, K, D, j, first_in, step_in, d, lane, lane_mask,
                                         lanes_total)
        decay_run, state = tl.associative_scan((tl.exp2(dtsum * A2[None, :]), local), 0, _first_order_combine)
        state = state + decay_run * carry[None, :]
        k_out = (first_out + (j + 1) * step_out).to(tl.int64)
        tl.store(out_base + k_out[:, None] * lanes_total + lane[None, :], state, mask=mask)
        carry = tl.sum(tl.where((rows == CHUNKS - 1)[:, None], state, 0.0), axis=0)
        dt_total += tl.sum(dtsum, axis=0)
    summary = (b * n_super + s) * lanes_total + lane
    tl.store(super_end_ptr + summary, carry, mask=lane_mask)
    tl.store(super_dt_ptr + summary, dt_total, mask=lane_mask)


@triton.jit
def _carry_fix_kernel(dtsum_ptr, A2_ptr, out_ptr, super_start_ptr, K, D, first_in, step_in, first_out, step_out,
                      SUPER, N: tl.constexpr, N_PAD: tl.constexpr, LANE_D: tl.constexpr, CHUNKS: tl.constexpr):
    """Level 3 of the carry: add the state entering superblock s + 1, decayed to each of its chunks."""
    d, lane, lane_mask = _carry_lanes(D, N, N_PAD, LANE_D)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2) + 1
    n_super = tl.num_programs(2) + 1
    lanes_total = D * N
    A2 = tl.load(A2_ptr + lane, mask=lane_mask, other=0.0)
    entering = tl.load(super_start_ptr + (b * (n_super + 1) + s) * lanes_total + lane, mask=lane_mask, other=0.0)
    dt_before = tl.zeros([N_PAD * LANE_D], dtype=tl.float32)
    out_base = out_ptr + b * (K + 1) * lanes_total
    rows = tl.arange(0, CHUNKS)
    for j0 in range(s * SUPER, s * SUPER + SUPER, CHUNKS):
        j = j0 + rows
        row = b * K + (first_in + j * step_in).to(tl.int64)
        mask = (j < K)[:, None] & lane_mask[None, :]
        dtsum = tl.load(dtsum_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0)
        prefix = dt_before[None, :] + tl.cumsum(dtsum, axis=0)  # delta summed from the superblock start
        k_out = (first_out + (j + 1) * step_out).to(tl.int64)
        ptrs = out_base + k_out[:, None] * lanes_total + lane[None, :]
        state = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, state + tl.exp2(prefix * A2[None, :]) * entering[None, :], mask=mask)
        dt_before += tl.sum(dtsum, axis=0)


@triton.jit
def _segment_output_kernel(
        u_ptr, su_b, su_d, su_l, dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, A2_ptr,
        B_ptr, sB0, sB1, sB2, sB3, C_ptr, sC0, sC1, sC2, sC3,
        D_ptr, z_ptr, sz_b, sz_d, sz_l, start_ptr,
        out_ptr, so_b, so_d, so_l,
        D, L, n_segments, chunks_per_segment, channels_per_group, blocks_per_program,
        N: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr,
        B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """The output of a segment's chunks, one after the other from the segment's entering state.

    start: (batch, segments + 1, N, D), the states entering the segments; a segment's slot is overwritten with its
    running state (the last slot, the final state, is not touched).
    """
    seg, b, split, n, n_mask = _program(N, N_PAD)
    segment_row = (b * (n_segments + 1) + seg) * D
    for i in range(chunks_per_segment):
        t, t_mask = _chunk_tokens(seg * chunks_per_segment + i, L, T)
        for block in range(blocks_per_program):
            d_start, d, d_mask, nd_mask = _channel_block(split, block, blocks_per_program, D, n_mask, BLOCK_D)
            group = d_start // channels_per_group
            mask = t_mask[:, None] & d_mask[None, :]
            state_ptrs = start_ptr + _state_offsets(segment_row, d, n, D, N)
            h0 = tl.load(state_ptrs, mask=nd_mask, other=0.0)
            A2 = tl.load(A2_ptr + _state_offsets(0, d, n, D, N), mask=nd_mask, other=0.0)
            u = _load_tokens(u_ptr, su_b, su_d, su_l, b, d, t, mask)
            dt, _ = _load_delta(dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, b, d, t, d_mask, mask, HAS_BIAS, SOFTPLUS)
            Bt = _load_bc(B_ptr, sB0, sB1, sB2, sB3, b, group, d, n, t, d_mask, n_mask, t_mask, B_VARIABLE)
            Ct = _load_bc(C_ptr, sC0, sC1, sC2, sC3, b, group, d, n, t, d_mask, n_mask, t_mask, C_VARIABLE)
            decay_run, h = tl.associative_scan((tl.exp2(A2[None, :, :] * dt[:, None, :]),
                                                (dt * u)[:, None, :] * Bt), 0, _first_order_combine)
            h += decay_run * h0[None, :, :]
            tl.store(state_ptrs, _last_token(h, T), mask=nd_mask)
            y = tl.sum(h * Ct, axis=1)  # (T, BLOCK_D)
            if HAS_D:
                y += tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :] * u
            if HAS_Z:
                zv = _load_tokens(z_ptr, sz_b, sz_d, sz_l, b, d, t, mask)
                y *= zv / (1.0 + tl.exp(-zv))
            tl.store(out_ptr + _token_offsets(so_b, so_d, so_l, b, d, t),
                     y.to(out_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()


@triton.jit
def _segment_adjoint_kernel(
        dout_ptr, sg_b, sg_d, sg_l, dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, A2_ptr,
        C_ptr, sC0, sC1, sC2, sC3, z_ptr, sz_b, sz_d, sz_l,
        adj_ptr, dtrun_ptr, local_ptr, suffix_ptr,
        D, L, n_segments, chunks_per_segment, channels_per_group, blocks_per_program,
        N: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr,
        C_VARIABLE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr):
    """What each segment passes to the one before it, Q = sum_t exp(A * sum_{s<=t} delta_s) C_t dy_t over the
    segment, walking its chunks from the last; and per chunk the same sum over the segment's later chunks (the
    adjoint entering the chunk from the right, counted from the segment's end) and the delta summed over them.
    dtrun (batch, segments, D) holds the running delta sum."""
    seg, b, split, n, n_mask = _program(N, N_PAD)
    padded_chunks = n_segments * chunks_per_segment
    segment_row = (b * n_segments + seg) * D
    for i in range(chunks_per_segment):
        chunk = seg * chunks_per_segment + chunks_per_segment - 1 - i
        t, t_mask = _chunk_tokens(chunk, L, T)
        for block in range(blocks_per_program):
            d_start, d, d_mask, nd_mask = _channel_block(split, block, blocks_per_program, D, n_mask, BLOCK_D)
            carry_ptrs, carry, dt_run = _running_state(adj_ptr, dtrun_ptr, segment_row, d, n, D, N, nd_mask, d_mask,
                                                       i > 0)
            _store_chunk_part(local_ptr, suffix_ptr, (b * padded_chunks + chunk) * D, d, n, D, N, carry, dt_run,
                              nd_mask, d_mask)
            mask = t_mask[:, None] & d_mask[None, :]
            A2 = tl.load(A2_ptr + _state_offsets(0, d, n, D, N), mask=nd_mask, other=0.0)
            dy = _load_tokens(dout_ptr, sg_b, sg_d, sg_l, b, d, t, mask)
            if HAS_Z:
                zv = _load_tokens(z_ptr, sz_b, sz_d, sz_l, b, d, t, mask)
                dy *= zv / (1.0 + tl.exp(-zv))
            dt, _ = _load_delta(dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, b, d, t, d_mask, mask, HAS_BIAS, SOFTPLUS)
            Ct = _load_bc(C_ptr, sC0, sC1, sC2, sC3, b, d_start // channels_per_group, d, n, t, d_mask, n_mask,
                          t_mask, C_VARIABLE)
            # the chunk's own part: a forward scan whose running decay is the product from the chunk's start
            decay = tl.exp2(A2[None, :, :] * dt[:, None, :])
            decay_run, _ = tl.associative_scan((decay, tl.zeros_like(decay)), 0, _first_order_combine)
            tl.store(carry_ptrs, tl.sum(decay_run * Ct * dy[:, None, :], axis=0) + _last_token(decay_run, T) * carry,
                     mask=nd_mask)
            tl.store(dtrun_ptr + segment_row + d, dt_run + tl.sum(dt, axis=0), mask=d_mask)
        tl.debug_barrier()


@triton.jit
def _chunk_grad_kernel(
        u_ptr, su_b, su_d, su_l, dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, A2_ptr,
        B_ptr, sB0, sB1, sB2, sB3, C_ptr, sC0, sC1, sC2, sC3,
        D_ptr, z_ptr, sz_b, sz_d, sz_l, dout_ptr, sg_b, sg_d, sg_l,
        start_ptr, local_ptr, prefix_ptr, carry_ptr, adj_local_ptr, suffix_ptr,  # see scan_backward
        du_ptr, ddt_ptr, sdu_b, sdu_d, sdu_l, dz_ptr, sdz_b, sdz_d, sdz_l,  # du and ddt share one layout
        dB_ptr, dC_ptr,  # variable: fp32 (batch, G, N, L) contiguous; time-invariant: partial (batch * K, D, N)
        dA_ptr, dD_ptr, dbias_ptr,  # partial sums: (batch * K, D, N), (batch * K, D), (batch * K, D)
        D, L, K, n_segments, chunks_per_segment, channels_per_group, blocks_per_program, groups,
        N: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr,
        B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BC_ATOMIC: tl.constexpr):
    k, b, split, n, n_mask = _program(N, N_PAD)
    t, t_mask = _chunk_tokens(k, L, T)
    seg = k // chunks_per_segment
    local_row = (b * n_segments * chunks_per_segment + k) * D
    segment_row = (b * (n_segments + 1) + seg) * D
    t_next = t + 1
    next_mask_t = (t_next < L) & (tl.arange(0, T) < T - 1)  # a_{t+1} inside this chunk; 1 at its end
    tn_mask = t_mask[:, None] & n_mask[None, :]
    dB_acc = tl.zeros([T, N_PAD], dtype=tl.float32)
    dC_acc = tl.zeros([T, N_PAD], dtype=tl.float32)
    group = (split * blocks_per_program * BLOCK_D) // channels_per_group
    for block in range(blocks_per_program):
        d_start, d, d_mask, nd_mask = _channel_block(split, block, blocks_per_program, D, n_mask, BLOCK_D)
        mask = t_mask[:, None] & d_mask[None, :]
        u = _load_tokens(u_ptr, su_b, su_d, su_l, b, d, t, mask)
        dt, raw = _load_delta(dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, b, d, t, d_mask, mask, HAS_BIAS, SOFTPLUS)
        A2 = tl.load(A2_ptr + _state_offsets(0, d, n, D, N), mask=nd_mask, other=0.0)
        Bt = _load_bc(B_ptr, sB0, sB1, sB2, sB3, b, group, d, n, t, d_mask, n_mask, t_mask, B_VARIABLE)
        Ct = _load_bc(C_ptr, sC0, sC1, sC2, sC3, b, group, d, n, t, d_mask, n_mask, t_mask, C_VARIABLE)
        dout = _load_tokens(dout_ptr, sg_b, sg_d, sg_l, b, d, t, mask)

        # States, recomputed from the chunk's entering state: its part from inside the segment plus the segment's
        # entering state decayed over the segment's earlier chunks.
        dtu = dt * u
        drive = dtu[:, None, :] * Bt
        decay_run, h = tl.associative_scan((tl.exp2(A2[None, :, :] * dt[:, None, :]), drive), 0,
                                           _first_order_combine)
        h0 = _chunk_entering(local_ptr, prefix_ptr, start_ptr, local_row, segment_row, A2, d, n, D, N, d_mask,
                             nd_mask)
        h += decay_run * h0[None, :, :]
        decayed_prev = h - drive  # a_t * h_{t-1}

        y = tl.sum(h * Ct, axis=1)
        if HAS_D:
            D_val = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
            y += D_val[None, :] * u
        if HAS_Z:
            zv = _load_tokens(z_ptr, sz_b, sz_d, sz_l, b, d, t, mask)
            sig = 1.0 / (1.0 + tl.exp(-zv))
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + _token_offsets(sdz_b, sdz_d, sdz_l, b, d, t),
                     dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dout * zv * sig
        else:
            dy = dout

        # Adjoints g_t = C_t dy_t + a_{t+1} g_{t+1}, scanned backwards from the carry of the later chunks: the
        # segment's later chunks plus the later segments' carry decayed over them.
        next_mask = next_mask_t[:, None] & d_mask[None, :]
        dt_next, _ = _load_delta(dt_ptr, sdt_b, sdt_d, sdt_l, bias_ptr, b, d, t_next, d_mask, next_mask,
                                 HAS_BIAS, SOFTPLUS)
        decay_after, g = _reverse_scan(tl.exp2(A2[None, :, :] * dt_next[:, None, :]), Ct * dy[:, None, :])
        carry = _chunk_entering(adj_local_ptr, suffix_ptr, carry_ptr, local_row, segment_row + D, A2, d, n, D, N,
                                d_mask, nd_mask)
        g += decay_after * carry[None, :, :]

        A_nat = A2 * LN2
        gB = tl.sum(g * Bt, axis=1)  # (T, BLOCK_D)
        g_prev = g * decayed_prev
        du = dt * gB
        if HAS_D:
            du += D_val[None, :] * dy
        ddt = tl.sum(g_prev * A_nat[None, :, :], axis=1) + u * gB
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-raw))
        ddt = tl.where(mask, ddt, 0.0)
        grad_offs = _token_offsets(sdu_b, sdu_d, sdu_l, b, d, t)
        tl.store(du_ptr + grad_offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddt_ptr + grad_offs, ddt.to(ddt_ptr.dtype.element_ty), mask=mask)

        part_dn = _state_offsets((b * K + k) * D, d, n, D, N)
        tl.store(dA_ptr + part_dn, tl.sum(g_prev * dt[:, None, :], axis=0), mask=nd_mask)
        part_d = (b * K + k) * D + d
        if HAS_D:
            tl.store(dD_ptr + part_d, tl.sum(dy * u, axis=0), mask=d_mask)
        if HAS_BIAS:
            tl.store(dbias_ptr + part_d, tl.sum(ddt, axis=0), mask=d_mask)
        if B_VARIABLE:
            dB_acc += tl.sum(g * dtu[:, None, :], axis=2)
        else:
            tl.store(dB_ptr + part_dn, tl.sum(g * dtu[:, None, :], axis=0), mask=nd_mask)
        if C_VARIABLE:
            dC_acc += tl.sum(h * dy[:, None, :], axis=2)
        else:
            tl.store(dC_ptr + part_dn, tl.sum(h * dy[:, None, :], axis=0), mask=nd_mask)

    bc_offs = ((b * groups + group) * N + n[None, :]) * L + t[:, None]
    if B_VARIABLE:
        if BC_ATOMIC:
            tl.atomic_add(dB_ptr + bc_offs, dB_acc, mask=tn_mask)
        else:
            tl.store(dB_ptr + bc_offs, dB_acc, mask=tn_mask)
    if C_VARIABLE:
        if BC_ATOMIC:
            tl.atomic_add(dC_ptr + bc_offs, dC_acc, mask=tn_mask)
        else:
            tl.store(dC_ptr + bc_offs, dC_acc, mask=tn_mask)


def _bc_layout(mat: torch.Tensor):
    """Return (variable, groups, four strides) describing B or C for the kernels."""
    if mat.dim() == 2:
        return False, 1, (mat.stride(0), mat.stride(1), 0, 0)
    if mat.dim() == 3:
        return True, 1, (mat.stride(0), 0, mat.stride(1), mat.stride(2))
    return True, mat.shape[1], tuple(mat.stride())


def _largest_power_of_two_dividing(value: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and value % (block * 2) == 0:
        block *= 2
    return block


class _Plan:
    """Launch geometry shared by the forward and backward passes of one call."""

    def __init__(self, batch, channels, length, d_state, groups, chunk, block_d, warps, chunks_per_segment,
                 grad_warps):
        self.chunk = chunk
        self.n_chunks = triton.cdiv(length, chunk)
        self.chunks_per_segment = max(1, min(chunks_per_segment, self.n_chunks))
        self.n_segments = triton.cdiv(self.n_chunks, self.chunks_per_segment)
        self.padded_chunks = self.n_segments * self.chunks_per_segment
        self.d_state_padded = triton.next_power_of_2(d_state)
        # Channel blocks must not straddle a B/C group (one B/C tile per block).
        per_group = channels // groups
        self.block_d = block_d if groups == 1 else _largest_power_of_two_dividing(per_group, block_d)
        self.channels_per_group = per_group if groups > 1 else max(channels, 1)
        blocks = triton.cdiv(channels, self.block_d)
        blocks_per_group = blocks if groups == 1 else per_group // self.block_d
        # One program per (chunk, batch, group) shares a B/C tile over all the group's channels and writes
        # dB/dC once; short sequences split the group over several programs to keep the GPU busy.
        splits = 1
        while (batch * self.n_chunks * groups * splits < MIN_PROGRAMS and splits < blocks_per_group
               and blocks_per_group % (splits * 2) == 0):
            splits *= 2
        self.blocks_per_program = triton.cdiv(blocks_per_group, splits)
        self.grid = (self.n_chunks, batch, groups * splits if groups > 1 else triton.cdiv(blocks, self.blocks_per_program))
        self.segment_grid = (self.n_segments,) + self.grid[1:]  # the end-state, output and adjoint kernels
        self.atomic = splits > 1
        self.warps = warps
        self.grad_warps = grad_warps

    def launch(self, d_state, gradient=False):
        """Keyword arguments every chunk kernel takes from the plan (the gradient kernel's warps with gradient)."""
        return dict(N=d_state, N_PAD=self.d_state_padded, T=self.chunk, BLOCK_D=self.block_d,
                    num_warps=self.grad_warps if gradient else self.warps)


def tiling_for(d_state: int):
    """Return the default (tokens per chunk, channels per tile, warps, gradient kernel's warps) for d_state."""
    forced = os.environ.get("NNUNETV2_MAMBA_TRITON_TILING", "").strip()
    if forced:
        parts = forced.split(":")
        if len(parts) not in (3, 4) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"triton scan: $NNUNETV2_MAMBA_TRITON_TILING must be 'T:BLOCK_D:WARPS[:GRAD_WARPS]' "
                             f"(whole numbers, e.g. '16:4:1:2'); got {forced!r}. Unset it for the tiling by d_state.")
        values = [int(p) for p in parts]
        if len(values) == 3:  # one warp count for every kernel
            values.append(values[2])
        return tuple(values)
    return TILINGS[max(16, triton.next_power_of_2(d_state))]


def _config(chunk, block_d, warps, d_state, grad_warps=None):
    """Return (chunk, block_d, warps, chunks per segment, gradient kernel's warps): explicit values, else the
    environment's, else the tiling for d_state. An explicit ``warps`` alone sets the gradient kernel's too."""
    default_chunk, default_block_d, default_warps, default_grad_warps = tiling_for(d_state)
    forced = os.environ.get("NNUNETV2_MAMBA_TRITON_CHUNK")
    chunk = int(forced) if forced else (chunk or default_chunk)
    block_d = block_d or default_block_d
    grad_warps = grad_warps or warps or default_grad_warps
    warps = warps or default_warps
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"triton scan: the chunk length must be a power of two >= 2; got {chunk}.")
    if any(v & (v - 1) for v in (block_d, warps, grad_warps)):
        raise ValueError(f"triton scan: the channels per tile and the warps must be powers of two; got {block_d}, "
                         f"{warps} and {grad_warps}.")
    value = os.environ.get("NNUNETV2_MAMBA_TRITON_SEGMENT") or str(CHUNKS_PER_SEGMENT)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"triton scan: $NNUNETV2_MAMBA_TRITON_SEGMENT must be a whole number of chunks >= 1; got "
                         f"{value!r}. Unset it for the default ({CHUNKS_PER_SEGMENT}).")
    segment = int(value)
    return chunk, block_d, warps, segment, grad_warps


def _state_matrix(A: torch.Tensor) -> torch.Tensor:
    """A * log2(e) as the kernels read it: fp32, (N, D)-contiguous like the state buffers (channels fastest)."""
    return (A.detach().float() * LOG2E).t().contiguous()


def _token_strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _empty_in_layout_of(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Return an empty (batch, D, L) tensor stored like x: token-major ((batch, L, D) memory) when x has unit
    stride along the channels, as the layers' tensors do (conv output, dt_proj output, halves of in_proj's output).

    The kernels read and write through strides; what the layout saves is torch's copies around them: the output
    then feeds out_proj's GEMM as it is, and du / ddelta / dz reach the GEMMs' backward and the conv's without a
    transposing copy or a mixed-layout add.
    """
    if x.stride(1) == 1 and x.shape[1] > 1:
        return empty_token_major(x, dtype)
    return torch.empty(x.shape, device=x.device, dtype=dtype or x.dtype)


def _segment_start_states(u, delta, A2, B, delta_bias, softplus, plan: _Plan, local=None, prefix=None):
    """Return (the states entering every segment, (batch, segments + 1, N, D) fp32 with the final state last; the
    segments' summed delta, (batch, segments, D)).

    Two phases (segment end states from zero, then the carry over the segments). With ``local`` / ``prefix``
    ((batch, padded chunks, N, D) / (.., D)) the first also writes each chunk's entering state counted from its
    segment's start and the delta summed before it in the segment (what the gradient kernel needs).
    """
    batch, channels, length = u.shape
    d_state = A2.shape[0]
    b_var, _, sB = _bc_layout(B)
    dtsum = torch.empty(batch, plan.n_segments, channels, device=u.device, dtype=torch.float32)
    ends = torch.empty(batch, plan.n_segments, d_state, channels, device=u.device, dtype=torch.float32)
    _segment_end_state_kernel[plan.segment_grid](
        u, *_token_strides(u), delta, *_token_strides(delta), A2 if delta_bias is None else delta_bias, A2,
        B, *sB, ends, dtsum, A2 if local is None else local, A2 if prefix is None else prefix,
        channels, length, plan.n_segments, plan.chunks_per_segment, plan.channels_per_group,
        plan.blocks_per_program, B_VARIABLE=b_var, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        WRITE_LOCAL=local is not None, **plan.launch(d_state))
    starts = torch.empty(batch, plan.n_segments + 1, d_state, channels, device=u.device, dtype=torch.float32)
    _carry(ends, dtsum, A2, starts, forward=True)
    return starts, dtsum


def _scan_forward(u, delta, A2, B, C, D, z, delta_bias, softplus, plan: _Plan, keep_states: bool):
    """Return (out, final state (batch, N, D) fp32; with keep_states=False and one segment, a zero placeholder)."""
    batch, channels, length = u.shape
    d_state = A2.shape[0]
    b_var, groups, sB = _bc_layout(B)
    c_var, _, sC = _bc_layout(C)
    dummy = A2  # any valid pointer for absent optional tensors
    if plan.n_segments > 1 or keep_states:
        # the output kernel overwrites the segments' slots with its running states; the last slot (the final
        # state) stays
        running, _ = _segment_start_states(u, delta, A2, B, delta_bias, softplus, plan)
    else:  # one segment entered from zero: no carry to compute
        running = torch.zeros(batch, 2, d_state, channels, device=u.device, dtype=torch.float32)
    out = _empty_in_layout_of(u)
    _segment_output_kernel[plan.segment_grid](
        u, *_token_strides(u), delta, *_token_strides(delta), dummy if delta_bias is None else delta_bias, A2,
        B, *sB, C, *sC, dummy if D is None else D, dummy if z is None else z,
        *(_token_strides(z) if z is not None else (0, 0, 0)), running,
        out, *_token_strides(out), channels, length, plan.n_segments, plan.chunks_per_segment,
        plan.channels_per_group, plan.blocks_per_program,
        B_VARIABLE=b_var, C_VARIABLE=c_var, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        HAS_D=D is not None, HAS_Z=z is not None, **plan.launch(d_state))
    return out, running[:, -1]  # the final state (batch, N, D): the state after the last segment


def _superblock(n_chunks: int) -> int:
    """Chunks per superblock of the two-level carry (a power-of-two multiple of CARRY_CHUNKS)."""
    if FORCED_SUPERBLOCK:
        return FORCED_SUPERBLOCK
    return max(CARRY_CHUNKS, triton.next_power_of_2(triton.cdiv(n_chunks, CARRY_SUPERBLOCKS)))


def _carry(local, dtsum, A2, out, forward: bool):
    """Fill out (batch, K + 1, N, D) with the states between chunks (forward) or the adjoints (backward)."""
    batch, K, d_state, channels = local.shape
    lanes = channels * d_state
    first_in, step_in, first_out, step_out = (0, 1, 0, 1) if forward else (K - 1, -1, K, -1)
    superblock = _superblock(K)
    n_super = triton.cdiv(K, superblock)
    geometry = dict(N=d_state, N_PAD=triton.next_power_of_2(d_state), LANE_D=CARRY_LANE_D, CHUNKS=CARRY_CHUNKS,
                    num_warps=1)
    channel_blocks = triton.cdiv(channels, CARRY_LANE_D)
    if n_super == 1:
        _chunk_carry_kernel[(channel_blocks, batch)](local, dtsum, A2, out, K, channels, first_in, step_in,
                                                     first_out, step_out, **geometry)
        return
    super_end = torch.empty(batch, n_super, d_state, channels, device=out.device, dtype=torch.float32)
    super_dt = torch.empty_like(super_end)
    _carry_local_kernel[(channel_blocks, batch, n_super)](local, dtsum, A2, out, super_end, super_dt, K, channels,
                                                          first_in, step_in, first_out, step_out, superblock,
                                                          **geometry)
    # Superblocks in logical order: one lane per (state, channel) with its own summed delta (an N = 1 view).
    super_start = torch.empty(batch, n_super + 1, lanes, device=out.device, dtype=torch.float32)
    _chunk_carry_kernel[(triton.cdiv(lanes, CARRY_LANE_D), batch)](
        super_end, super_dt, A2, super_start, n_super, lanes, 0, 1, 0, 1,
        **dict(geometry, N=1, N_PAD=1))
    _carry_fix_kernel[(channel_blocks, batch, n_super - 1)](dtsum, A2, out, super_start, K, channels, first_in,
                                                            step_in, first_out, step_out, superblock, **geometry)


class SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, block_d, warps, grad_warps):
        plan, groups = make_plan(u, A, B, C, chunk, block_d, warps, grad_warps)
        A2 = _state_matrix(A)
        # The kernels index D and delta_bias with unit stride.
        D_skip = None if D is None else D.contiguous()
        bias = None if delta_bias is None else delta_bias.contiguous()
        with torch.autocast(device_type=u.device.type, enabled=False):
            out, final_state = _scan_forward(u, delta, A2, B, C, D_skip, z, bias, delta_softplus, plan,
                                             keep_states=True)
        last_state = final_state.transpose(1, 2).contiguous()
        # nothing else is kept: the backward recomputes what it needs (the chunks' states, not only the segments')
        ctx.save_for_backward(u, delta, A, B, C, D_skip, z, bias)
        ctx.plan, ctx.delta_softplus, ctx.groups = plan, delta_softplus, groups
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, grad_out, _grad_state):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        grads = scan_backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.plan, ctx.groups,
                              grad_out)
        return grads + (None, None, None, None, None)


def make_plan(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk=None, block_d=None,
              warps=None, grad_warps=None):
    """Return (launch plan, B/C groups) of a scan of u (batch, D, L) with these B and C."""
    batch, channels, length = u.shape
    groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    config = _config(chunk, block_d, warps, A.shape[1], grad_warps)
    return _Plan(batch, channels, length, A.shape[1], groups, *config), groups


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, plan: _Plan) -> torch.Tensor:
    """Return the scan output alone (no autograd; nothing kept): the forward of a caller's own Function."""
    A2 = _state_matrix(A)
    with torch.autocast(device_type=u.device.type, enabled=False):
        out, _ = _scan_forward(u, delta, A2, B, C, D, z, delta_bias, delta_softplus, plan, keep_states=False)
    return out


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, plan: _Plan, groups: int, grad_out):
    """Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of a scan. D and delta_bias must have unit stride.

    The gradient kernel rebuilds each chunk's entering state from (state counted from its segment's start, delta
    summed before it in the segment, the segment's entering state), and its adjoint carry likewise from the
    segment's end: the per-chunk parts come straight from the segment kernels, so only per-segment states are
    carried."""
    batch, channels, length = u.shape
    d_state = A.shape[1]
    K = plan.n_chunks
    A2 = _state_matrix(A)
    b_var, _, sB = _bc_layout(B)
    c_var, _, sC = _bc_layout(C)
    dummy = A2
    common = plan.launch(d_state)
    bias = dummy if delta_bias is None else delta_bias
    z_strides = _token_strides(z) if z is not None else (0, 0, 0)
    dev = u.device
    with torch.autocast(device_type=dev.type, enabled=False):
        local_shape = (batch, plan.padded_chunks, d_state, channels)
        local, prefix = (torch.empty(local_shape, device=dev, dtype=torch.float32),
                         torch.empty(local_shape[:2] + (channels,), device=dev, dtype=torch.float32))
        starts, dtsum = _segment_start_states(u, delta, A2, B, delta_bias, delta_softplus, plan, local, prefix)
        adj = torch.empty(batch, plan.n_segments, d_state, channels, device=dev, dtype=torch.float32)
        adj_local, suffix = torch.empty_like(local), torch.empty_like(prefix)
        suffix_run = torch.empty_like(dtsum)
        _segment_adjoint_kernel[plan.segment_grid](
            grad_out, *_token_strides(grad_out), delta, *_token_strides(delta), bias, A2, C, *sC,
            dummy if z is None else z, *z_strides, adj, suffix_run, adj_local, suffix,
            channels, length, plan.n_segments, plan.chunks_per_segment, plan.channels_per_group,
            plan.blocks_per_program, C_VARIABLE=c_var, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_Z=z is not None, **common)
        carries = torch.empty(batch, plan.n_segments + 1, d_state, channels, device=dev, dtype=torch.float32)
        _carry(adj, dtsum, A2, carries, forward=False)
        del adj

        du = _empty_in_layout_of(u)
        ddelta = _empty_in_layout_of(u, delta.dtype)  # the kernel writes both through one set of strides
        dz = _empty_in_layout_of(z) if z is not None else None
        partial_dn = torch.empty(batch * K, d_state, channels, device=dev, dtype=torch.float32)

        def bc_grad_buffer(mat, variable):
            if variable:  # one slice per group even for a shared B/C next to a grouped C/B: summed below
                alloc = torch.zeros if plan.atomic else torch.empty
                return alloc(batch, groups, d_state, length, device=dev, dtype=torch.float32)
            return torch.empty(batch * K, d_state, channels, device=dev, dtype=torch.float32)

        dB_buf, dC_buf = bc_grad_buffer(B, b_var), bc_grad_buffer(C, c_var)
        dD_part = torch.empty(batch * K, channels, device=dev, dtype=torch.float32) if D is not None else None
        dbias_part = (torch.empty(batch * K, channels, device=dev, dtype=torch.float32)
                      if delta_bias is not None else None)
        _chunk_grad_kernel[plan.grid](
            u, *_token_strides(u), delta, *_token_strides(delta), bias, A2, B, *sB, C, *sC,
            dummy if D is None else D, dummy if z is None else z, *z_strides,
            grad_out, *_token_strides(grad_out), starts, local, prefix, carries, adj_local, suffix,
            du, ddelta, *_token_strides(du), dummy if dz is None else dz,
            *(_token_strides(dz) if dz is not None else (0, 0, 0)), dB_buf, dC_buf, partial_dn,
            dummy if dD_part is None else dD_part, dummy if dbias_part is None else dbias_part,
            channels, length, K, plan.n_segments, plan.chunks_per_segment, plan.channels_per_group,
            plan.blocks_per_program, groups, B_VARIABLE=b_var, C_VARIABLE=c_var, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_D=D is not None, HAS_Z=z is not None, BC_ATOMIC=plan.atomic,
            **plan.launch(d_state, gradient=True))
        del local, prefix, adj_local, suffix, starts, carries

        dA = partial_dn.sum(0).t().contiguous()  # (D, N), like A

        def bc_grad(buf, mat, variable):
            if not variable:
                return buf.sum(0).t().contiguous().to(mat.dtype)
            if mat.dim() == 3:
                buf = buf[:, 0] if groups == 1 else buf.sum(1)
            return buf.to(mat.dtype)

        dB = bc_grad(dB_buf, B, b_var)
        dC = bc_grad(dC_buf, C, c_var)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA.to(A.dtype), dB, dC, dD, dz, dbias


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk: Optional[int] = None, block_d: Optional[int] = None,
                          warps: Optional[int] = None, grad_warps: Optional[int] = None):
    """Return the selective scan output (and the final state if asked), computed by the Triton kernels."""
    out, last_state = SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                chunk, block_d, warps, grad_warps)
    return (out, last_state) if return_last_state else out
