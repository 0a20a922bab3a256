"""Precision policy helper shared by the networks' mixer wrappers (ARCHITECTURES.md §0.6)."""
from __future__ import annotations

from typing import Callable

import torch


def run_in_fp32(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return function(x) computed in fp32 with autocast disabled (fp16/bf16 input is cast up).

    Mamba under fp16 autocast overflows (ARCHITECTURES.md §0.6, §6.4), so the references disable autocast for the whole
    mixer (norms, projections, scan). bf16 is cast too: it would otherwise reach fp32 LayerNorm weights. The
    result stays fp32; the next convolution re-casts it under autocast.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return function(x)
