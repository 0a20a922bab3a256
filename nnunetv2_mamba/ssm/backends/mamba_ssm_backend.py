"""mamba-ssm's compiled CUDA selective scan (and causal-conv1d's fused conv when installed)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from nnunetv2_mamba.ssm.backends.base import ScanBackend

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# mamba_ssm's kernel keeps the state of one thread in registers; it is compiled for at most 256 states.
MAX_D_STATE = 256


@functools.lru_cache(maxsize=None)
def _import_selective_scan():
    """Return (selective_scan_fn, None) or (None, reason it could not be imported)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # ImportError, or an OSError/RuntimeError from a broken CUDA build
        return None, (f"mamba_ssm could not be imported ({type(error).__name__}: {error}). "
                      "Install it with `pip install nnunetv2-mamba[cuda]` (needs nvcc and a CUDA build of torch).")
    return selective_scan_fn, None


@functools.lru_cache(maxsize=None)
def _import_causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.lru_cache(maxsize=None)
def _import_mamba_inner():
    # mamba_inner_fn calls causal-conv1d's CUDA extension directly, so it is only usable when that imports.
    if _import_causal_conv1d() is None:
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception:
        return None
    return mamba_inner_fn


class MambaSsmBackend(ScanBackend):
    name = "mamba_ssm"
    description = "mamba-ssm's CUDA kernel (CUDA tensors, fp32/fp16/bf16, d_state <= 256)"

    def unavailable_reason(self) -> Optional[str]:
        _, reason = _import_selective_scan()
        if reason is None and not torch.cuda.is_available():
            return "mamba_ssm is installed but no CUDA device is visible."
        return reason

    def unsupported_reason(self, u: torch.Tensor, A: torch.Tensor) -> Optional[str]:
        if u.device.type != "cuda":
            return f"mamba_ssm runs on CUDA tensors only; got a tensor on {u.device}."
        if u.dtype not in _CUDA_DTYPES:
            return f"mamba_ssm supports fp32/fp16/bf16 inputs; got {u.dtype}."
        if A.shape[1] > MAX_D_STATE:
            return f"mamba_ssm supports d_state <= {MAX_D_STATE}; got {A.shape[1]}."
        return None

    def scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False):
        selective_scan_fn, _ = _import_selective_scan()
        # The kernel wants contiguous inputs, delta/variable B/C/z in u's dtype and fp32 A/D/delta_bias;
        # it keeps its state in fp32 whatever the input dtype.
        dtype = u.dtype

        def variable(mat):
            return mat.to(dtype).contiguous() if mat.dim() >= 3 else mat.float().contiguous()

        with torch.autocast(device_type="cuda", enabled=False):
            return selective_scan_fn(
                u.contiguous(), delta.to(dtype).contiguous(), A.float().contiguous(), variable(B), variable(C),
                None if D is None else D.float(), None if z is None else z.to(dtype).contiguous(),
                None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)

    def causal_conv1d(self):
        return _import_causal_conv1d()

    def fused_mamba_inner(self):
        return _import_mamba_inner()
