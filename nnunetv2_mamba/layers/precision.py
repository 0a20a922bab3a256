"""Precision policy of the networks' mixer wrappers (ARCHITECTURES.md §0.6).

Mamba under fp16 autocast overflows (§6.4), so the references run their mixers in fp32 with autocast off. bf16
has fp32's exponent range, so on a GPU with bf16 the plugin runs the mixers under bf16 autocast instead
(projections, convs and scan inputs in bf16, LayerNorm and the scan state in fp32): fewer bytes moved and saved
for the same range. ``$NNUNETV2_MAMBA_MIXER_DTYPE`` chooses: ``auto`` (default: bf16 on CUDA under autocast
when the GPU supports it, else fp32), ``fp32`` (the references' policy) or ``bf16`` (bf16 under autocast on
CUDA even where the automatic check says no).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

MIXER_DTYPE_ENV_VAR = "NNUNETV2_MAMBA_MIXER_DTYPE"
MIXER_DTYPE_CHOICES = ("auto", "fp32", "bf16")


def requested_mixer_dtype() -> str:
    """Return the validated value of $NNUNETV2_MAMBA_MIXER_DTYPE ("auto" when unset)."""
    choice = os.environ.get(MIXER_DTYPE_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in MIXER_DTYPE_CHOICES:
        raise ValueError(f"${MIXER_DTYPE_ENV_VAR}={choice!r} is not a mixer precision; use one of "
                         f"{', '.join(MIXER_DTYPE_CHOICES)} (or unset it for 'auto').")
    return choice


def autocast_disabled(device_type: str):
    """Return a context with autocast off on ``device_type``; a no-op on the meta device (no autocast there),
    where the memory planner runs the networks to count their saved tensors (planning/memory.py)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def mixer_dtype(device_type: str, autocast_enabled: bool) -> torch.dtype:
    """Return the dtype the mixers compute in on ``device_type`` with autocast on or off around them.

    Without autocast (CPU training, NoAMP trainers) everything is fp32, as before. nnU-Net autocasts only on
    CUDA, so bf16 is used only there.
    """
    choice = requested_mixer_dtype()
    if choice == "fp32" or device_type != "cuda" or not autocast_enabled:
        return torch.float32
    if choice == "bf16" or (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def run_in_fp32(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return function(x) computed in fp32 with autocast disabled (fp16/bf16 input is cast up).

    bf16 is cast too: it would otherwise reach fp32 LayerNorm weights. The result stays fp32; the next
    convolution re-casts it under autocast.
    """
    with autocast_disabled(x.device.type):
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return function(x)


def run_mixer(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return function(x) under the mixer precision policy: bf16 autocast where it applies, else fp32.

    Under bf16 autocast, fp16 input from the previous convolution is cast to bf16 by the first projection
    (LayerNorm runs in fp32 under autocast); the result is in bf16 or fp32, and the next convolution re-casts
    it, as with the fp32 policy.
    """
    autocast_enabled = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    if mixer_dtype(x.device.type, autocast_enabled) is torch.bfloat16:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return function(x)
    return run_in_fp32(function, x)
