"""Memory format the networks run their feature maps in: channels last for 3D maps on the GPU.

cuDNN runs fp16 3D convolutions in NDHWC; given NCDHW tensors it converts every input and output around them
(``nchwToNhwcKernel`` / ``nhwcToNchwKernel``). On one H200 at the 128^3 plan those conversions took 12 of
PlainConvUNet's 63 ms of kernels per training step and 26 of U-Mamba-Bot's 106 (BENCHMARKS.md, 2026-12-03); a
channels-last input makes cuDNN keep channels last end to end (its weights are converted per call: a few MB), so
the conversions go. Everything downstream reads that layout without copies: the instance norm
(``triton_norm_channels_last.py``), the Mamba layers' tokens (a channels-last map's memory *is* its (B, L, C)
tokens), elementwise ops. Checkpoints are unaffected (parameters keep their format) and so are the values, up to
summation order.

``$NNUNETV2_MAMBA_CHANNELS_LAST``: ``auto`` (default: 3D maps on CUDA), ``0`` (never, for comparisons) or ``1``
(2D and 3D maps on CUDA, 3D maps on the CPU too: the CPU tests use it). 2D maps on the CPU stay contiguous even then:
torch 2.14.1's CPU Conv2d computes wrong weight gradients for a strided 1x1 conv on channels-last input (50 of 100
random trials; 3D convs were right in all 400), and U-Mamba's residual blocks have such shortcuts.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

CHANNELS_LAST_ENV_VAR = "NNUNETV2_MAMBA_CHANNELS_LAST"
CHANNELS_LAST_CHOICES = ("auto", "0", "1")
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last_format(x: torch.Tensor) -> Optional[torch.memory_format]:
    """Return the channels-last memory format of a 4D / 5D tensor (None for other ranks)."""
    return _FORMATS.get(x.dim())


def is_channels_last(x: torch.Tensor) -> bool:
    """Return whether the 4D / 5D map ``x`` is stored channels last and not also contiguous (a map with one channel
    or one position is both, and then counts as contiguous)."""
    memory_format = channels_last_format(x)
    return memory_format is not None and not x.is_contiguous() and x.is_contiguous(memory_format=memory_format)


def requested_channels_last() -> str:
    """Return the validated value of $NNUNETV2_MAMBA_CHANNELS_LAST ("auto" when unset)."""
    choice = os.environ.get(CHANNELS_LAST_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHANNELS_LAST_CHOICES:
        raise ValueError(f"${CHANNELS_LAST_ENV_VAR}={choice!r} is not a choice; use auto (channels last for 3D maps "
                         f"on the GPU), 0 (never) or 1 (always), or unset it.")
    return choice


def to_network_memory_format(x: torch.Tensor) -> torch.Tensor:
    """Return the network input ``x`` (B, C, *S) in the memory format the network should run in (same values)."""
    choice = requested_channels_last()
    if choice == "0" or x.dim() not in _FORMATS or (choice == "auto" and not (x.is_cuda and x.dim() == 5)):
        return x
    if x.dim() == 4 and not x.is_cuda:  # torch's CPU Conv2d gradient bug (module docstring)
        return x
    return x.contiguous(memory_format=channels_last_format(x))
