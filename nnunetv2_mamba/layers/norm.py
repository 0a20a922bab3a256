"""Instance norm that runs the Triton kernels (``triton_norm.py``) on the GPU: a drop-in for the plans' norm_op.

``InstanceNorm3d`` / ``InstanceNorm2d`` subclass torch's, so parameters, state_dict keys and ``isinstance`` checks
are unchanged and any checkpoint loads either way; only ``forward`` differs, and only for CUDA tensors (or CPU
tensors under ``TRITON_INTERPRET=1``, the tests) with the nnU-Net configuration (no running statistics). Everything
else, CPU inference included, runs ``F.instance_norm`` as before. ``fast_norm_op`` swaps torch's classes for these
when a network is built; $NNUNETV2_MAMBA_FAST_NORM=0 keeps torch's (for comparisons).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Type

import torch
import torch.nn as nn

from nnunetv2_mamba.ssm.backends.triton_backend import triton_interpreting

logger = logging.getLogger(__name__)

FAST_NORM_ENV_VAR = "NNUNETV2_MAMBA_FAST_NORM"


@functools.lru_cache(maxsize=None)
def _triton_function():
    """Return the Triton autograd Function, or None (with the reason logged once) when Triton cannot be imported."""
    try:
        from nnunetv2_mamba.layers.triton_norm import InstanceNormTriton
    except Exception as error:  # no Triton in this torch build: torch's instance norm everywhere
        logger.info("Triton instance norm unavailable (%s: %s); using torch's", type(error).__name__, error)
        return None
    return InstanceNormTriton


class _TritonInstanceNormMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_axis = 1 if x.dim() == self._get_no_batch_dim() + 1 else 0
        if x.dim() > channel_axis and x.shape[channel_axis] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)} has {x.shape[channel_axis]} "
                             f"channels, the layer was built for {self.num_features}; check the plan's "
                             f"features_per_stage against the network's.")
        function = _triton_function() if (x.is_cuda or triton_interpreting()) else None
        if (function is None or self.track_running_stats or not x.is_contiguous()
                or x.dim() != self._get_no_batch_dim() + 1 or x[0, 0].numel() < 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
            return super().forward(x)
        return function.apply(x, self.weight if self.affine else None, self.bias if self.affine else None, self.eps)


class InstanceNorm3d(_TritonInstanceNormMixin, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` whose GPU forward and backward are the Triton kernels."""


class InstanceNorm2d(_TritonInstanceNormMixin, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` whose GPU forward and backward are the Triton kernels."""


_FAST = {nn.InstanceNorm3d: InstanceNorm3d, nn.InstanceNorm2d: InstanceNorm2d}


def fast_norm_op(norm_op: Optional[Type[nn.Module]]) -> Optional[Type[nn.Module]]:
    """Return the Triton-backed class for torch's InstanceNorm2d/3d, any other norm_op (or None) unchanged."""
    if os.environ.get(FAST_NORM_ENV_VAR, "1") in ("0", ""):
        return norm_op
    return _FAST.get(norm_op, norm_op)
