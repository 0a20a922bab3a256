"""Registration object for the sequence-parallel Triton scan (``triton_scan.py``): no compiled extension.

Available when Triton imports and a CUDA device is visible, or, for the CPU tests, when
``TRITON_INTERPRET=1`` was set before Triton was imported (the kernels then run in Triton's interpreter on
CPU tensors, slowly).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from nnunetv2_mamba.ssm.backends.base import ScanBackend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The (tokens, d_state, channels) tiles live in registers; beyond 64 states they spill.
MAX_D_STATE = 64
# From this many tokens on, the automatic choice takes triton ahead of mamba_ssm. One H200, Mamba(d_model) layer
# forward + backward, bf16 (BENCHMARKS.md, 2026-12-02 fifth session): 2 x 2,097,152 tokens (a 128^3 stage) triton
# 1.57x faster (fp32: 1.62x); 2 x 262,144 (64^3) mamba_ssm 1.09x faster, and more so at 32,768 and 4,096 tokens.
# $NNUNETV2_MAMBA_TRITON_MIN_LENGTH moves the threshold (0: always triton where it can run).
PREFERRED_MIN_LENGTH = 2 ** 20
# ... and up to this many states. Beyond, mamba_ssm's kernel (states in shared memory, not registers) stays ahead at
# every length measured: one H200, the layer's forward + backward, bf16, d_state 64 (SegMamba's 64^3 stage), 2 x
# 262,144 tokens x 64 channels mamba_ssm 37.6 ms vs triton 54.1 ms with its d_state-64 tiling; before that tiling,
# 2 x 32,768 x 128 took 10.2 vs 27.0 ms, and with triton at that stage SegMamba's training step took 325.6 ms instead
# of 266.7 (BENCHMARKS.md, 2026-12-03 ninth session). At d_state 32 (its 128^3 stage) triton is 1.61x faster (93.1
# vs 150.0 ms).
PREFERRED_MAX_D_STATE = 32


def preferred_min_length() -> int:
    """Sequence length from which the automatic choice prefers triton ($NNUNETV2_MAMBA_TRITON_MIN_LENGTH)."""
    value = os.environ.get("NNUNETV2_MAMBA_TRITON_MIN_LENGTH", "").strip()
    if not value:
        return PREFERRED_MIN_LENGTH
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"$NNUNETV2_MAMBA_TRITON_MIN_LENGTH must be a whole number of tokens; got {value!r}. "
                         "Unset it for the measured default.") from None


def triton_interpreting() -> bool:
    """Return whether Triton runs its kernels in the CPU interpreter ($TRITON_INTERPRET, read at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _import_triton_scan():
    """Return (selective_scan_triton, None) or (None, why Triton could not be imported)."""
    try:
        from nnunetv2_mamba.ssm.backends.triton_scan import selective_scan_triton
    except Exception as error:  # ImportError, or a broken Triton install
        return None, (f"triton could not be imported ({type(error).__name__}: {error}). It ships with CUDA "
                      "builds of torch; reinstall torch from the CUDA wheel index or `pip install triton`.")
    return selective_scan_triton, None


class TritonBackend(ScanBackend):
    name = "triton"
    description = ("sequence-parallel Triton kernels (CUDA tensors, fp32/fp16/bf16, d_state <= "
                   f"{MAX_D_STATE}; no compiled extension)")

    def unavailable_reason(self) -> Optional[str]:
        _, reason = _import_triton_scan()
        if reason is None and not torch.cuda.is_available() and not triton_interpreting():
            return "triton is installed but no CUDA device is visible."
        return reason

    def unsupported_reason(self, u: torch.Tensor, A: torch.Tensor) -> Optional[str]:
        if u.device.type != "cuda" and not (triton_interpreting() and u.device.type == "cpu"):
            return (f"the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
                    f"got a tensor on {u.device}. Use backend='torch' for CPU tensors.")
        if u.dtype not in _DTYPES:
            return f"the triton backend supports fp32/fp16/bf16 inputs; got {u.dtype}. Use backend='torch'."
        if A.shape[1] > MAX_D_STATE:
            return (f"the triton backend supports d_state <= {MAX_D_STATE}; got {A.shape[1]}. "
                    "Use backend='mamba_ssm' or 'torch'.")
        return None

    def preferred_for(self, u, A) -> bool:
        # supports() already requires CUDA (or the interpreter); $NNUNETV2_MAMBA_TRITON_MIN_LENGTH=0 means "always
        # triton where it can run", d_state included
        threshold = preferred_min_length()
        return u.shape[-1] >= threshold and (threshold == 0 or A.shape[1] <= PREFERRED_MAX_D_STATE)

    def causal_conv1d(self):
        # Our Triton conv + SiLU (triton_conv.py) by default: on one H200 it took the layer's forward+backward at
        # 2 x 128^3 tokens from 158 to 122 ms (bf16) and 138 to 111 ms (fp32), peak -1 / -2 GiB (BENCHMARKS.md,
        # 2026-12-02). $NNUNETV2_MAMBA_TRITON_CONV=0 falls back to torch's grouped conv (for comparisons).
        if os.environ.get("NNUNETV2_MAMBA_TRITON_CONV", "1") in ("", "0"):
            return None
        from nnunetv2_mamba.ssm.backends.triton_conv import causal_conv1d_silu
        return causal_conv1d_silu

    def fused_mamba_inner(self):
        # Opt-in until measured on the GPU (benchmarks/TRITON_NOTES.md): the layer's inner part as one Function that
        # keeps only xz and the weights (triton_layer.py).
        if os.environ.get("NNUNETV2_MAMBA_TRITON_FUSED", "0") in ("", "0"):
            return None
        from nnunetv2_mamba.ssm.backends.triton_layer import mamba_inner_triton
        return mamba_inner_triton

    def scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False):
        selective_scan_triton, _ = _import_triton_scan()
        return selective_scan_triton(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus, return_last_state=return_last_state)
