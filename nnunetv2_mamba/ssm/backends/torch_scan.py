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
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

# Elements of one (B, D, chunk, N) working tensor. About 8 such tensors live at once in the backward
# pass; 2**24 fp32 elements is 64 MiB each. Larger chunks mean fewer Python steps; measured on 2 CPU cores,
# 2**23 ran about 2.5x faster than 2**20 (fewer, longer vectorised passes).
_DEFAULT_CHUNK_ELEMENTS_GPU = 2 ** 24
_DEFAULT_CHUNK_ELEMENTS_CPU = 2 ** 23
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
    """
    length = decay.shape[-2]
    if length <= _BLOCK:
        for t in range(1, length):
            drive[..., t, :] += decay[..., t, :] * drive[..., t - 1, :]
        return drive
    n_blocks = -(-length // _BLOCK)
    padding = n_blocks * _BLOCK - length
    if padding:  # padded positions: decay 1, drive 0; they come after the real ones and are dropped
        decay = F.pad(decay, (0, 0, 0, padding), value=1.0)
        drive = F.pad(drive, (0, 0, 0, padding), value=0.0)
    lead, d_state = decay.shape[:-2], decay.shape[-1]
    block_decay = decay.view(*lead, n_blocks, _BLOCK, d_state)
    block_drive = drive.view(*lead, n_blocks, _BLOCK, d_state)
    # One reused buffer for the products: no fresh allocation of 1/_BLOCK of the tensor per step. Multiply then
    # add (not addcmul_, which fuses them on the CPU and rounds differently) keeps the results bit for bit.
    product = torch.empty_like(block_drive[..., 0, :])
    for t in range(1, _BLOCK):  # local states and cumulative decays inside every block
        torch.mul(block_decay[..., t, :], block_drive[..., t - 1, :], out=product)
        block_drive[..., t, :] += product
        block_decay[..., t, :] *= block_decay[..., t - 1, :]
    # State entering block k (k >= 1): H_k = D_{k-1} H_{k-1} + E_{k-1}, with D/E the block's total decay and
    # local end state; H_0 = 0 (an initial state is already folded into drive_0 by the caller).
    entering = _linear_recurrence(block_decay[..., :-1, -1, :].clone(), block_drive[..., :-1, -1, :].clone())
    # decay is scratch (overwritten, see above): the product goes into it instead of a new full-size tensor.
    block_drive[..., 1:, :, :] += block_decay[..., 1:, :, :].mul_(entering[..., :, None, :])
    states = block_drive.view(*lead, n_blocks * _BLOCK, d_state)
    return states[..., :length, :] if padding else states


def _expand_bc(mat: torch.Tensor, start: int, end: int, channels: int) -> torch.Tensor:
    """Return B or C for tokens [start, end) as a tensor broadcastable to (batch, channels, T, N)."""
    if mat.dim() == 2:  # (D, N): the same for every token
        return mat[None, :, None, :]
    if mat.dim() == 3:  # (batch, N, L): shared by all channels
        return mat[:, None, :, start:end].transpose(-1, -2)
    groups = mat.shape[1]  # (batch, G, N, L): shared by the channels of one group
    per_group = mat[:, :, :, start:end].transpose(-1, -2)  # (batch, G, T, N)
    return per_group.repeat_interleave(channels // groups, dim=1)


def _reduce_bc_grad(grad: torch.Tensor, mat: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
    """Accumulate the gradient of an expanded B/C chunk (batch, D, T, N) into ``out`` (shaped like mat)."""
    if mat.dim() == 2:
        out += grad.sum(dim=(0, 2))
    elif mat.dim() == 3:
        out[:, :, start:end] += grad.sum(dim=1).transpose(-1, -2)
    else:
        b, d, t, n = grad.shape
        groups = mat.shape[1]
        out[:, :, :, start:end] += grad.view(b, groups, d // groups, t, n).sum(dim=2).transpose(-1, -2)


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the state always accumulates in at least fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        out_dtype = u.dtype
        with torch.autocast(device_type=u.device.type, enabled=False):
            uf, Af, Bf, Cf = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
            dt = delta.to(dtype)
            if delta_bias is not None:
                dt = dt + delta_bias.to(dtype)[:, None]
            if delta_softplus:
                dt = F.softplus(dt)
            batch, channels, length = u.shape
            d_state = A.shape[1]
            state = uf.new_zeros(batch, channels, d_state)
            chunk_starts = []
            y = torch.empty_like(uf)
            for start in range(0, length, chunk):
                end = min(start + chunk, length)
                chunk_starts.append(state)
                states = _chunk_states(uf, dt, Af, Bf, state, start, end)
                state = states[:, :, -1, :].clone()
                # The states are not needed after this chunk (the backward recomputes them), so C is multiplied
                # in place: one (B, D, T, N) temporary less per chunk.
                y[:, :, start:end] = states.mul_(_expand_bc(Cf, start, end, channels)).sum(-1)
            if D is not None:
                y = y + D.to(dtype)[:, None] * uf
            out = y * F.silu(z.to(dtype)) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(chunk_starts))
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.mark_non_differentiable(state)
        return out.to(out_dtype), state

    @staticmethod
    def backward(ctx, grad_out, _grad_state):
        u, delta, A, B, C, D, z, delta_bias, chunk_starts = ctx.saved_tensors
        dtype = chunk_starts.dtype
        chunk = ctx.chunk
        with torch.autocast(device_type=u.device.type, enabled=False):
            uf, Af, Bf, Cf = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
            raw_dt = delta.to(dtype)
            if delta_bias is not None:
                raw_dt = raw_dt + delta_bias.to(dtype)[:, None]
            dt = F.softplus(raw_dt) if ctx.delta_softplus else raw_dt
            gout = grad_out.to(dtype)
            batch, channels, length = u.shape

            gu = torch.zeros_like(uf)
            gdt = torch.zeros_like(uf)
            gA = torch.zeros_like(Af)
            gB = torch.zeros_like(Bf)
            gC = torch.zeros_like(Cf)
            gz = torch.zeros_like(uf) if z is not None else None
            gy_full = gout * F.silu(z.to(dtype)) if z is not None else gout
            carry = None  # d loss / d h_{start-1} contribution flowing from the later chunks
            n_chunks = chunk_starts.shape[0]
            for index in range(n_chunks - 1, -1, -1):
                start = index * chunk
                end = min(start + chunk, length)
                h0 = chunk_starts[index]
                dt_c, u_c = dt[:, :, start:end], uf[:, :, start:end]
                decay = torch.exp(dt_c[..., None] * Af[None, :, None, :])  # (b, d, T, N)
                B_c = _expand_bc(Bf, start, end, channels)
                C_c = _expand_bc(Cf, start, end, channels)
                states = _chunk_states(uf, dt, Af, Bf, h0, start, end, decay=decay.clone())
                gy = gy_full[:, :, start:end]
                if z is not None:
                    y_c = (states * C_c).sum(-1)
                    if D is not None:
                        y_c = y_c + D.to(dtype)[:, None] * u_c
                    z_c = z[:, :, start:end].to(dtype)
                    sig = torch.sigmoid(z_c)
                    gz[:, :, start:end] = gout[:, :, start:end] * y_c * sig * (1 + z_c * (1 - sig))
                # Reverse recurrence g_t = gy_t * C_t + decay_{t+1} * g_{t+1}, solved as a forward scan
                # on the flipped chunk; the carry from the next chunk enters at the last position.
                direct = gy[..., None] * C_c
                if carry is not None:
                    direct[:, :, -1, :] += carry
                shifted_decay = torch.zeros_like(decay)
                shifted_decay[:, :, :-1, :] = decay[:, :, 1:, :]
                g_states = _linear_recurrence(shifted_decay.flip(-2), direct.flip(-2).contiguous()).flip(-2)
                carry = decay[:, :, 0, :] * g_states[:, :, 0, :]

                prev_states = torch.cat([h0[:, :, None, :], states[:, :, :-1, :]], dim=2)
                g_decay_term = g_states * decay * prev_states  # d loss / d (dt * A)
                gdt[:, :, start:end] = (g_decay_term * Af[None, :, None, :]).sum(-1) + (
                    g_states * B_c).sum(-1) * u_c
                gA += (g_decay_term * dt_c[..., None]).sum(dim=(0, 2))
                gu[:, :, start:end] = (g_states * B_c).sum(-1) * dt_c
                _reduce_bc_grad(g_states * (dt_c * u_c)[..., None], B, gB, start, end)
                _reduce_bc_grad(gy[..., None] * states, C, gC, start, end)

            gD = None
            if D is not None:
                gu = gu + D.to(dtype)[:, None] * gy_full
                gD = (gy_full * uf).sum(dim=(0, 2))
            if ctx.delta_softplus:
                gdt = gdt * torch.sigmoid(raw_dt)
            g_delta_bias = gdt.sum(dim=(0, 2)) if delta_bias is not None else None

        def cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (cast(gu, u), cast(gdt, delta), cast(gA, A), cast(gB, B), cast(gC, C), cast(gD, D), cast(gz, z),
                cast(g_delta_bias, delta_bias), None, None)


def _chunk_states(u, dt, A, B, h0, start, end, decay=None):
    """Return the states h_t (batch, D, T, N) of tokens [start, end) given the state h0 before them."""
    dt_c = dt[:, :, start:end]
    if decay is None:  # exp in place: one (B, D, T, N) allocation instead of two
        decay = torch.mul(dt_c[..., None], A[None, :, None, :]).exp_()
    drive = (dt_c * u[:, :, start:end])[..., None] * _expand_bc(B, start, end, u.shape[1])
    drive = drive.contiguous()
    drive[:, :, 0, :] += decay[:, :, 0, :] * h0
    return _linear_recurrence(decay, drive)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Return the selective scan output (and the final state if asked), computed in pure PyTorch."""
    batch, channels, length = u.shape
    chunk = _chunk_length(batch, channels, A.shape[1], length, u.device)
    out, last_state = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
    return (out, last_state) if return_last_state else out

