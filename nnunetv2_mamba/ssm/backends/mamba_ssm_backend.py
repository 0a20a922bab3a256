"""mamba-ssm's compiled CUDA selective scan (and causal-conv1d's fused conv when installed)."""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable, Optional

import torch

from nnunetv2_mamba.ssm.backends.base import ScanBackend

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# mamba_ssm's kernel keeps the state of one thread in registers; it is compiled for at most 256 states.
MAX_D_STATE = 256

logger = logging.getLogger(__name__)

# First-call errors of an extension built for another GPU architecture, CUDA or torch version.
_BUILD_MISMATCH = ("no kernel image", "invalid device function", "not compiled for", "unsupported gpu",
                   "undefined symbol", "driver version is insufficient", "named symbol not found",
                   "not compatible with")


def _first_call_failure(package: str, device: torch.device, call: Callable[[], object]) -> Optional[str]:
    """Return why ``call`` (a tiny kernel launch on ``device``) fails, with the fix, or None if it runs.

    mamba-ssm / causal-conv1d import fine when built for another GPU architecture or torch version and only
    fail at their first kernel launch; the automatic backend choice then skips them (with a warning) instead
    of failing in the middle of a training step.
    """
    try:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # RuntimeError / torch.AcceleratorError from the CUDA runtime
        text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        capability = ""
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            capability = f" (sm_{major}{minor}, torch {torch.__version__}, CUDA {torch.version.cuda})"
        cause = ("it was built for another GPU architecture or torch/CUDA version"
                 if any(p in text.lower() for p in _BUILD_MISMATCH) else "its first kernel call fails")
        reason = (f"{package} is installed but its CUDA kernel does not run on {device}{capability}: {cause} "
                  f"({text}). Reinstall it for this machine: pip install --force-reinstall --no-cache-dir "
                  f"--no-build-isolation --no-binary {package} {package}.")
        warnings.warn(f"{reason} The automatic backend choice skips it.", RuntimeWarning, stacklevel=2)
        logger.warning("%s The automatic backend choice skips it.", reason)
        return reason
    return None


@functools.lru_cache(maxsize=None)
def _scan_kernel_failure(device: torch.device) -> Optional[str]:
    selective_scan_fn, _ = _import_selective_scan()
    if selective_scan_fn is None:
        return None

    def call():
        u = torch.ones(1, 2, 4, device=device)
        B = torch.ones(1, 1, 4, device=device)
        selective_scan_fn(u, u, -torch.ones(2, 1, device=device), B, B)
    return _first_call_failure("mamba-ssm", device, call)


@functools.lru_cache(maxsize=None)
def _conv_kernel_failure(device: torch.device) -> Optional[str]:
    causal_conv1d_fn = _import_causal_conv1d()
    if causal_conv1d_fn is None:
        return None
    return _first_call_failure("causal-conv1d", device, lambda: causal_conv1d_fn(
        torch.ones(1, 2, 4, device=device), torch.ones(2, 4, device=device), None, activation="silu"))


def _current_cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


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
        return _scan_kernel_failure(u.device)

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
        # A causal-conv1d that does not run here falls back to torch's Conv1d (and the unfused path).
        if _import_causal_conv1d() is None or _conv_kernel_failure(_current_cuda_device()) is not None:
            return None
        causal_conv1d_fn = _import_causal_conv1d()

        def conv(x, weight, bias=None, activation=None):  # causal-conv1d reads x (B, D, L)-contiguous
            return causal_conv1d_fn(x.contiguous(), weight, bias, activation=activation)
        return conv

    def fused_mamba_inner(self):
        return _import_mamba_inner() if self.causal_conv1d() is not None else None
