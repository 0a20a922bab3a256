"""Pure-PyTorch selective scan: runs on any device, chunked so memory stays bounded, exact backward.

Math (mamba_ssm ``selective_scan_fn`` semantics), per batch b, channel d and state n:

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n C_t * h_t + D * u_t
    out_t   = y_t * silu(z_t)                              (if z is given)

The sequence is cut into chunks that are processed one after another (the state is carried across);
inside a chunk the linear recurrence is solved for all positions at once with a blocked scan (a loop over
the 16 positions of a block, run for all blocks together, then the same on the block ends), so there is no
Python loop over tokens and the work stays linear in the length. The backward pass recomputes each
chunk's states from the saved chunk-start states instead of keeping the (B, D, L, N) state tensor, so
training memory grows with L * D, not L * D * N.

Layout: the working tensors are token-major, (batch, T, D, N). One step of the blocked recurrence then touches,
per block, a contiguous run of D * N values (instead of N = 16 in a (batch, D, T, N) layout), which the CPU
streams and vectorises far better; and the projections feeding the scan already store dt, B, C and z token-major
(``(B, L, D)`` memory viewed as ``(B, D, L)``), so reading them costs no transposing copy. The output is returned
as a ``(B, D, L)`` view of token-major memory, which is the layout ``out_proj`` wants next.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

# Elements of one (B, chunk, D, N) working tensor. About 8 such tensors live at once in the backward pass.
# On the CPU the chunk is sized so that the forward's two working tensors (decay, states) stay in the last-level
# cache: measured on 2 cores (32 MiB L3), a U-Mamba-Enc stage-0 scan forward ran fastest at 2**21 elements (8 MiB per
# tensor), about 1.4x faster than at 2**23 and 1.1x faster than at 2**20 (more, shorter Python steps; BENCHMARKS.md).
_DEFAULT_CHUNK_ELEMENTS_GPU = 2 ** 24
_DEFAULT_CHUNK_ELEMENTS_CPU = 2 ** 21
_MIN_CHUNK, _MAX_CHUNK = 16, 2 ** 16
# Positions per block of the blocked recurrence (see _linear_recurrence).
_BLOCK = 16


def _chunk_length(batch: int, channels: int, d_state: int, length: int, device: torch.device) -> int:
    """Return the number of tokens per chunk (a power of two, or the whole sequence if shorter)."""
    forced = os.environ.get("NNUNETV2_MAMBA_TORCH_CHUNK")
    if forced:
        return max(1, min(int(forced), length))
    budget = _DEFAULT_CHUNK_ELEMENTS_GPU if device.type == "cuda" else _DEFAULT_CHUNK_ELEMENTS_CPU
    per_token = max(1, batch * channels * d_state)
    chunk = _MIN_CHUNK
    while chunk * 2 <= _MAX_CHUNK and chunk * 2 * per_token <= budget:
        chunk *= 2
    return min(chunk, length)


def _linear_recurrence(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """Return h with h_t = decay_t * h_{t-1} + drive_t (h_{-1} = 0) along dim -2; inputs are overwritten.

    Blocked scan: the T positions are cut into blocks of _BLOCK; a short loop over the positions of a block
    runs for all blocks at once (giving each block's local states and cumulative decays), the states
    entering each block are solved the same way on the (T / _BLOCK) block ends, and one broadcast adds them
    back. Work is O(T) (a few passes over the tensors) and Python steps O(_BLOCK * log_BLOCK(T)). Only
    products of decays in [0, 1] and sums are formed, so nothing can overflow.

    Each update is one fused multiply-add (``addcmul_``): one pass over the operands instead of two, and on the
    CPU one rounding instead of two (tests/nnunetv2_mamba/ssm/test_scan.py checks the result is at least as close
    to an fp64 reference as the multiply-then-add it replaced; docs/DECISIONS.md).
    """
    length = decay.shape[-2]
    if length <= _BLOCK:
        for t in range(1, length):
            drive[..., t, :].addcmul_(decay[..., t, :], drive[..., t - 1, :])
        return drive
    n_blocks = -(-length // _BLOCK)
    padding = n_blocks * _BLOCK - length
    if padding:  # padded positions: decay 1, drive 0; they come after the real ones and are dropped
        decay = F.pad(decay, (0, 0, 0, padding), value=1.0)
        drive = F.pad(drive, (0, 0, 0, padding), value=0.0)
    lead, width = decay.shape[:-2], decay.shape[-1]
    block_decay = decay.view(*lead, n_blocks, _BLOCK, width)
    block_drive = drive.view(*lead, n_blocks, _BLOCK, width)
    for t in range(1, _BLOCK):  # local states and cumulative decays inside every block
        block_drive[..., t, :].addcmul_(block_decay[..., t, :], block_drive[..., t - 1, :])
        block_decay[..., t, :] *= block_decay[..., t - 1, :]
    # State at the end of block k: S_k = D_k S_{k-1} + E_k, with D/E the block's total decay and local end state
    # (S_{-1} = 0: an initial state is already folded into drive_0 by the caller); block k >= 1 is entered with
    # S_{k-1}. Solving for all n_blocks ends (the last one unused) keeps a power-of-two chunk free of padding.
    entering = _linear_recurrence(block_decay[..., -1, :].clone(), block_drive[..., -1, :].clone())[..., :-1, :]
    block_drive[..., 1:, :, :].addcmul_(block_decay[..., 1:, :, :], entering[..., :, None, :])
    states = block_drive.view(*lead, n_blocks * _BLOCK, width)
    return states[..., :length, :] if padding else states


def _bc_tokens(mat: torch.Tensor, start: int, end: int, channels: int) -> torch.Tensor:
    """Return B or C for tokens [start, end) as a tensor broadcastable to (batch, T, channels, N)."""
    if mat.dim() == 2:  # (D, N): the same for every token
        return mat[None, None]
    if mat.dim() == 3:  # (batch, N, L): shared by all channels
        return mat[:, :, start:end].transpose(1, 2)[:, :, None, :]
    groups = mat.shape[1]  # (batch, G, N, L): shared by the channels of one group
    per_group = mat[:, :, :, start:end].permute(0, 3, 1, 2)  # (batch, T, G, N)
    return per_group.repeat_interleave(channels // groups, dim=2)


def _reduce_bc_grad(grad: torch.Tensor, mat: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
    """Accumulate the gradient of an expanded B/C chunk (batch, T, D, N) into ``out`` (shaped like mat)."""
    if mat.dim() == 2:
        out += grad.sum(dim=(0, 1))
    elif mat.dim() == 3:
        out[:, :, start:end] += grad.sum(dim=2).transpose(1, 2)
    else:
        b, t, d, n = grad.shape
        groups = mat.shape[1]
        out[:, :, :, start:end] += grad.view(b, t, groups, d // groups, n).sum(dim=3).permute(0, 2, 3, 1)


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the state always accumulates in at least fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """Return the token-major (batch, L, D) view of a (batch, D, L) tensor (no copy)."""
    return x.transpose(1, 2)


def _decay_exponent(dt_t, A, start, end, out=None):
    """Return dt * A of tokens [start, end) as a contiguous (batch, T, D, N) tensor (written into ``out`` if given)."""
    dt_c = dt_t[:, start:end, :, None]
    if out is None:
        out = dt_t.new_empty(dt_c.shape[:3] + A.shape[1:])
    return torch.mul(dt_c, A, out=out)


def _chunk_states(u_t, dt_t, A, B, h0, start, end, decay=None, drive=None):
    """Return the states h_t (batch, T, D, N) of tokens [start, end) given the state h0 (batch, D, N) before them.

    ``u_t``, ``dt_t`` are token-major (batch, L, D). ``decay``, if given, holds exp(dt * A) of the chunk
    (contiguous (batch, T, D, N)); ``drive`` is an optional contiguous buffer for the states (the forward reuses
    two buffers for all chunks instead of allocating fresh ones per chunk). Both are overwritten: on return
    ``decay`` holds scratch (cumulative decays) and the states live in ``drive``'s memory.
    """
    batch, _, channels = u_t.shape
    shape = (batch, end - start, channels, A.shape[1])
    if decay is None:  # contiguous whatever the inputs' layout: the recurrence views it as (batch, T, D * N)
        decay = torch.exp(_decay_exponent(dt_t, A, start, end))
    if drive is None:
        drive = u_t.new_empty(shape)
    dtu = (dt_t[:, start:end] * u_t[:, start:end])[..., None]
    torch.mul(dtu, _bc_tokens(B, start, end, channels), out=drive)
    drive[:, 0].addcmul_(decay[:, 0], h0)
    batch, length, channels, d_state = drive.shape
    states = _linear_recurrence(decay.view(batch, length, channels * d_state),
                                drive.view(batch, length, channels * d_state))
    return states.view(batch, length, channels, d_state)


def _delta(delta, delta_bias, delta_softplus, dtype):
    """Return (raw dt, dt) in ``dtype``: raw = delta + bias, dt = softplus(raw) if asked; layout of delta kept."""
    raw = delta.to(dtype)
    if delta_bias is not None:
        raw = raw + delta_bias.to(dtype)[:, None]
    return raw, (F.softplus(raw) if delta_softplus else raw)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        out_dtype = u.dtype
        if u.device.type == "meta":  # shapes only (the memory planner's probe): what the loop below saves
            # and returns, without its thousands of steps
            batch, channels, length = u.shape
            n_chunks = -(-length // chunk)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias,
                                  u.new_empty(n_chunks, batch, channels, A.shape[1], dtype=dtype))
            ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
            y = u.new_empty(batch, length, channels, dtype=dtype)
            return y.transpose(1, 2).to(out_dtype), u.new_empty(batch, channels, A.shape[1], dtype=dtype)
        with torch.autocast(device_type=u.device.type, enabled=False):
            uf, Af, Bf, Cf = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
            _, dt = _delta(delta, delta_bias, delta_softplus, dtype)
            u_t, dt_t = _tokens(uf), _tokens(dt)
            batch, channels, length = u.shape
            d_state = A.shape[1]
            state = uf.new_zeros(batch, channels, d_state)
            chunk_starts = []
            y = uf.new_empty(batch, length, channels)  # token-major
            # Two flat buffers reused by every chunk: a fresh allocation per chunk costs page faults on the CPU.
            per_chunk = batch * min(chunk, length) * channels * d_state
            decay_buffer, drive_buffer = uf.new_empty(per_chunk), uf.new_empty(per_chunk)
            for start in range(0, length, chunk):
                end = min(start + chunk, length)
                shape = (batch, end - start, channels, d_state)
                size = shape[0] * shape[1] * shape[2] * shape[3]
                chunk_starts.append(state)
                decay = _decay_exponent(dt_t, Af, start, end, out=decay_buffer[:size].view(shape)).exp_()
                states = _chunk_states(u_t, dt_t, Af, Bf, state, start, end, decay=decay,
                                       drive=drive_buffer[:size].view(shape))
                state = states[:, -1].clone()
                # The states are dead after this chunk (the backward recomputes them): C is multiplied in place.
                torch.sum(states.mul_(_bc_tokens(Cf, start, end, channels)), dim=-1, out=y[:, start:end])
            if D is not None:
                y.addcmul_(u_t, D.to(dtype))
            if z is not None:
                y.mul_(F.silu(_tokens(z.to(dtype))))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(chunk_starts))
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.mark_non_differentiable(state)
        return y.transpose(1, 2).to(out_dtype), state

    @staticmethod
    def backward(ctx, grad_out, _grad_state):
        u, delta, A, B, C, D, z, delta_bias, chunk_starts = ctx.saved_tensors
        dtype = chunk_starts.dtype
        chunk = ctx.chunk
        with torch.autocast(device_type=u.device.type, enabled=False):
            uf, Af, Bf, Cf = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
            raw_dt, dt = _delta(delta, delta_bias, ctx.delta_softplus, dtype)
            u_t, dt_t = _tokens(uf), _tokens(dt)
            gout = _tokens(grad_out.to(dtype))
            batch, channels, length = u.shape
            Df = D.to(dtype) if D is not None else None

            gu = uf.new_zeros(batch, length, channels)
            gdt = uf.new_zeros(batch, length, channels)
            gA = torch.zeros_like(Af)
            gB = torch.zeros_like(Bf)
            gC = torch.zeros_like(Cf)
            gz = uf.new_zeros(batch, length, channels) if z is not None else None
            z_t = _tokens(z.to(dtype)) if z is not None else None
            gy_full = gout * F.silu(z_t) if z is not None else gout
            carry = None  # d loss / d h_{start-1} contribution flowing from the later chunks
            n_chunks = chunk_starts.shape[0]
            for index in range(n_chunks - 1, -1, -1):
                start = index * chunk
                end = min(start + chunk, length)
                h0 = chunk_starts[index]
                dt_c, u_c = dt_t[:, start:end], u_t[:, start:end]
                decay = _decay_exponent(dt_t, Af, start, end).exp_()  # (b, T, d, N), contiguous
                B_c = _bc_tokens(Bf, start, end, channels)
                C_c = _bc_tokens(Cf, start, end, channels)
                states = _chunk_states(u_t, dt_t, Af, Bf, h0, start, end, decay=decay.clone())
                gy = gy_full[:, start:end]
                if z is not None:
                    y_c = torch.linalg.vecdot(states, C_c)
                    if Df is not None:
                        y_c = y_c + Df * u_c
                    z_c = z_t[:, start:end]
                    sig = torch.sigmoid(z_c)
                    gz[:, start:end] = gout[:, start:end] * y_c * sig * (1 + z_c * (1 - sig))
                # Reverse recurrence g_t = gy_t * C_t + decay_{t+1} * g_{t+1}, solved as a forward scan
                # on the flipped chunk; the carry from the next chunk enters at the last position.
                direct = gy[..., None] * C_c
                if carry is not None:
                    direct[:, -1] += carry
                shifted_decay = torch.zeros_like(decay)
                shifted_decay[:, :-1] = decay[:, 1:]
                width = channels * decay.shape[-1]
                g_states = _linear_recurrence(shifted_decay.flip(1).view(batch, -1, width),
                                              direct.flip(1).reshape(batch, -1, width)).view_as(decay).flip(1)
                carry = decay[:, 0] * g_states[:, 0]

                prev_states = torch.cat([h0[:, None], states[:, :-1]], dim=1)
                g_decay_term = g_states * decay * prev_states  # d loss / d (dt * A)
                g_states_b = torch.linalg.vecdot(g_states, B_c)
                gdt[:, start:end] = torch.linalg.vecdot(g_decay_term, Af) + g_states_b * u_c
                gA += (g_decay_term * dt_c[..., None]).sum(dim=(0, 1))
                gu[:, start:end] = g_states_b * dt_c
                _reduce_bc_grad(g_states * (dt_c * u_c)[..., None], B, gB, start, end)
                _reduce_bc_grad(gy[..., None] * states, C, gC, start, end)

            gD = None
            if Df is not None:
                gu = gu + Df * gy_full
                gD = (gy_full * u_t).sum(dim=(0, 1))
            if ctx.delta_softplus:
                gdt = gdt * torch.sigmoid(_tokens(raw_dt))
            g_delta_bias = gdt.sum(dim=(0, 1)) if delta_bias is not None else None

        def cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        gu, gdt = gu.transpose(1, 2), gdt.transpose(1, 2)
        gz = gz.transpose(1, 2) if gz is not None else None
        return (cast(gu, u), cast(gdt, delta), cast(gA, A), cast(gB, B), cast(gC, C), cast(gD, D), cast(gz, z),
                cast(g_delta_bias, delta_bias), None, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Return the selective scan output (and the final state if asked), computed in pure PyTorch."""
    batch, channels, length = u.shape
    chunk = _chunk_length(batch, channels, A.shape[1], length, u.device)
    out, last_state = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
    return (out, last_state) if return_last_state else out
