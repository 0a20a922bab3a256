"""Norms that run Triton kernels on the GPU: instance norm (``triton_norm.py``), a drop-in for the plans' norm_op,
and the Mamba layers' LayerNorm of a channel-major map's tokens (``token_layer_norm``, ``triton_token_norm.py``).

``InstanceNorm3d`` / ``InstanceNorm2d`` (contiguous maps: ``triton_norm.py``; channels-last maps:
``triton_norm_channels_last.py``) subclass torch's, so parameters, state_dict keys and ``isinstance`` checks
are unchanged and any checkpoint loads either way; only ``forward`` differs, and only for CUDA tensors (or CPU
tensors under ``TRITON_INTERPRET=1`` with ``$NNUNETV2_MAMBA_FAST_NORM=1``, the kernel tests) with the nnU-Net
configuration (no running statistics). Everything else, CPU inference included, runs ``F.instance_norm`` as before.
``fast_norm_op`` swaps torch's classes for these when a network is built; $NNUNETV2_MAMBA_FAST_NORM=0 keeps torch's
(for comparisons), for both norms.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Optional, Type

import torch
import torch.nn as nn

from nnunetv2_mamba.layers.memory_format import channels_last_format, is_channels_last
from nnunetv2_mamba.ssm.backends.triton_backend import triton_interpreting

logger = logging.getLogger(__name__)

FAST_NORM_ENV_VAR = "NNUNETV2_MAMBA_FAST_NORM"


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fast_norm_enabled() -> bool:
    """Return False when $NNUNETV2_MAMBA_FAST_NORM=0 asks for torch's norms."""
    return os.environ.get(FAST_NORM_ENV_VAR, "1") not in ("0", "")


def _runs_triton(x: torch.Tensor) -> bool:
    """Return whether the norm kernels run for ``x``: CUDA tensors, or CPU tensors in Triton's interpreter when
    $NNUNETV2_MAMBA_FAST_NORM=1 says so explicitly (the kernel tests). The interpreter runs the norms' reductions
    in Python, seconds per call (10 s for a 16 x 8^3 map): a network run under TRITON_INTERPRET=1 to check the
    scan kernels' logic takes torch's norms unless asked."""
    if x.is_cuda:
        return True
    return triton_interpreting() and x.device.type == "cpu" and os.environ.get(FAST_NORM_ENV_VAR, "") == "1"


@functools.lru_cache(maxsize=None)
def _triton_function(name: str = "InstanceNormTriton"):
    """Return a Triton autograd Function (``InstanceNormTriton``, ``InstanceNormChannelsLastTriton`` or
    ``TokenLayerNormTriton``), or None (with the reason logged once) when Triton cannot be imported."""
    module = {"InstanceNormTriton": "triton_norm", "InstanceNormChannelsLastTriton": "triton_norm_channels_last",
              "TokenLayerNormTriton": "triton_token_norm"}[name]
    try:
        return getattr(importlib.import_module(f"nnunetv2_mamba.layers.{module}"), name)
    except Exception as error:  # no Triton in this torch build: torch's norms everywhere
        logger.info("Triton %s unavailable (%s: %s); using torch's", name, type(error).__name__, error)
        return None


def token_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Return ``norm(x.transpose(1, 2))``, the LayerNorm of a (B, C, L) map's tokens, as (B, L, C) tokens.

    On the GPU one Triton kernel reads the map and writes contiguous tokens in ``dtype``; by default that is the
    autocast dtype when autocast is on (what the next projection casts them to), else x's dtype. A residual stream
    that starts at the norm asks for ``torch.float32``, what torch's LayerNorm gives under autocast. Elsewhere, or
    for norms it does not cover, torch's LayerNorm of the transposed view (fp32 under autocast, as always).
    """
    if x.dim() != 3 or tuple(norm.normalized_shape) != (x.shape[1],):
        raise ValueError(f"token_layer_norm needs a (batch, channels, tokens) map with {tuple(norm.normalized_shape)} "
                         f"channels for this LayerNorm; got shape {tuple(x.shape)}.")
    function = _triton_function("TokenLayerNormTriton") if _runs_triton(x) else None
    if (function is None or not fast_norm_enabled() or x.dtype not in _FLOAT_DTYPES or x.shape[2] == 0
            or x.shape[1] > function.max_channels or (norm.weight is None) != (norm.bias is None)):
        return norm(x.transpose(1, 2))
    if dtype is None:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return function.apply(x, norm.weight, norm.bias, norm.eps, dtype)


def stream_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """Return ``token_layer_norm`` of the (B, C, L) map x in the dtype torch's LayerNorm gives (fp32 under autocast,
    else x's dtype): for a norm whose output is a residual stream, not only a projection's input."""
    dtype = torch.float32 if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type) else x.dtype
    return token_layer_norm(x, norm, dtype)


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


class _TritonInstanceNormMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_axis = 1 if x.dim() == self._get_no_batch_dim() + 1 else 0
        if x.dim() > channel_axis and x.shape[channel_axis] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)} has {x.shape[channel_axis]} "
                             f"channels, the layer was built for {self.num_features}; check the plan's "
                             f"features_per_stage against the network's.")
        function = None
        if (_runs_triton(x) and not self.track_running_stats and x.dtype in _FLOAT_DTYPES
                and x.dim() == self._get_no_batch_dim() + 1 and x[0, 0].numel() >= 2):
            if x.is_contiguous():
                function = _triton_function("InstanceNormTriton")
            elif is_channels_last(x):
                function = _triton_function("InstanceNormChannelsLastTriton")
                if function is not None and x.shape[1] > function.max_channels:
                    function = None
        if function is None:
            y = super().forward(x)
            if is_channels_last(x):  # torch's returns NCDHW: keep the network's layout
                y = y.contiguous(memory_format=channels_last_format(x))
            if y.requires_grad:
                # torch's CPU instance norm computes a wrong dx from a channels-last gradient (torch 2.14.1: errors
                # the size of the gradient itself; contiguous ones are right), and a channels-last network hands
                # it one: make it contiguous on its way in (a no-op for contiguous gradients)
                y.register_hook(_contiguous)
            return y
        return function.apply(x, self.weight if self.affine else None, self.bias if self.affine else None, self.eps)


class InstanceNorm3d(_TritonInstanceNormMixin, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` whose GPU forward and backward are the Triton kernels."""


class InstanceNorm2d(_TritonInstanceNormMixin, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` whose GPU forward and backward are the Triton kernels."""


_FAST = {nn.InstanceNorm3d: InstanceNorm3d, nn.InstanceNorm2d: InstanceNorm2d}


def fast_norm_op(norm_op: Optional[Type[nn.Module]]) -> Optional[Type[nn.Module]]:
    """Return the Triton-backed class for torch's InstanceNorm2d/3d, any other norm_op (or None) unchanged."""
    if not fast_norm_enabled():
        return norm_op
    return _FAST.get(norm_op, norm_op)
