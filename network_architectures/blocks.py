"""Convolutional building blocks shared by the plugin's U-Net-shaped networks (ARCHITECTURES.md §0.4).

- ``BasicResBlock``: U-Mamba's residual block (two k-convs with bias, optional 1x1 shortcut, nonlin after the sum).
- ``residual_stage``: one resolution level = ``BasicResBlock`` (carries the stride / channel change) followed by
  ``n_blocks - 1`` dynamic_network_architectures ``BasicBlockD`` (ResNet-D) blocks, as an ``nn.Sequential`` so
  that state_dict keys read ``<stage>.0.conv1.weight``, ``<stage>.1.conv1.conv.weight``, like the reference.
- ``UpsampleLayer``: interpolation followed by a 1x1 conv (not a transposed conv), computed as the conv first (the same
  function on fewer voxels).
- ``init_he``: the initialisation rule of the conv networks (nnU-Net's ``InitWeights_He(1e-2)`` on the whole
  model, called at the end of every network's ``__init__``).
- ``network_kwargs``: a plan's constructor keywords as the builders pass them (torch's instance norm replaced by
  the Triton-backed subclass of ``nnunetv2_mamba.layers.norm``, same parameters).

Only torch, dynamic_network_architectures and the plugin's own layers are imported here (never nnunetv2), so other
families (LoG-VMamba, ...) can reuse the blocks without depending on nnU-Net.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0

from nnunetv2_mamba.layers.memory_format import channels_last_format, is_channels_last
from nnunetv2_mamba.layers.norm import fast_norm_op

IntOrSeq = Union[int, Sequence[int]]

__all__ = ["BasicResBlock", "UpsampleLayer", "residual_stage", "init_he", "network_kwargs", "BasicBlockD",
           "InitWeights_He"]


def network_kwargs(plan, with_input_size: bool = False) -> Dict[str, Any]:
    """Return ``plan.unet_kwargs(...)`` with the norm_op through ``fast_norm_op`` (what the builders pass)."""
    kwargs = plan.unet_kwargs(with_input_size=with_input_size)
    kwargs["norm_op"] = fast_norm_op(kwargs["norm_op"])
    return kwargs


def _per_axis(conv_op: Type[nn.Module], value: IntOrSeq) -> list:
    """Return ``value`` as a per-axis list of Python ints (scalars are expanded to the conv's dimension)."""
    return [int(v) for v in maybe_convert_scalar_to_list(conv_op, value)]


def _make_norm(norm_op: Optional[Type[nn.Module]], channels: int, norm_op_kwargs: Optional[Dict[str, Any]]):
    """Return ``norm_op(channels, **kwargs)`` or Identity when the plan has no norm."""
    return nn.Identity() if norm_op is None else norm_op(channels, **(norm_op_kwargs or {}))


def _make_nonlin(nonlin: Optional[Type[nn.Module]], nonlin_kwargs: Optional[Dict[str, Any]]):
    """Return ``nonlin(**kwargs)`` or Identity when the plan has no nonlinearity."""
    return nn.Identity() if nonlin is None else nonlin(**(nonlin_kwargs or {}))


class BasicResBlock(nn.Module):
    """U-Mamba residual block: conv-norm-act-conv-norm + (1x1 conv | identity) shortcut, then act.

    Both k-convs always have a bias (the reference ignores the plan's ``conv_bias`` here). Padding is k//2
    per axis, so odd kernels keep the size and the first conv's stride alone sets the output size. Attribute
    names (``conv1, norm1, act1, conv2, norm2, act2, conv3``) follow the reference so checkpoints map 1:1;
    ``conv3`` is the 1x1 shortcut and exists only with ``use_1x1conv``.
    """

    def __init__(self, conv_op: Type[nn.Module], input_channels: int, output_channels: int,
                 kernel_size: IntOrSeq, stride: IntOrSeq = 1, use_1x1conv: bool = False,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[Dict[str, Any]] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        kernel_size = _per_axis(conv_op, kernel_size)
        stride = _per_axis(conv_op, stride)
        padding = [k // 2 for k in kernel_size]
        if not use_1x1conv and (input_channels != output_channels or any(s != 1 for s in stride)):
            raise ValueError(f"BasicResBlock without a 1x1 shortcut needs input_channels == output_channels and "
                             f"stride 1; got {input_channels} -> {output_channels}, stride {stride}. Pass "
                             f"use_1x1conv=True.")
        self.input_channels = int(input_channels)
        self.output_channels = int(output_channels)
        self.stride = stride
        self.conv1 = conv_op(input_channels, output_channels, kernel_size, stride=stride, padding=padding, bias=True)
        self.norm1 = _make_norm(norm_op, output_channels, norm_op_kwargs)
        self.act1 = _make_nonlin(nonlin, nonlin_kwargs)
        self.conv2 = conv_op(output_channels, output_channels, kernel_size, stride=1, padding=padding, bias=True)
        self.norm2 = _make_norm(norm_op, output_channels, norm_op_kwargs)
        self.act2 = _make_nonlin(nonlin, nonlin_kwargs)
        self.conv3 = (conv_op(input_channels, output_channels, kernel_size=1, stride=stride, bias=True)
                      if use_1x1conv else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output (B, output_channels, *S / stride)."""
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x if self.conv3 is None else self.conv3(x)
        return self.act2(y + shortcut)


def residual_stage(conv_op: Type[nn.Module], input_channels: int, output_channels: int, kernel_size: IntOrSeq,
                   stride: IntOrSeq, n_blocks: int, conv_bias: bool = True,
                   norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[Dict[str, Any]] = None,
                   dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[Dict[str, Any]] = None,
                   nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[Dict[str, Any]] = None,
                   use_1x1conv: bool = True) -> nn.Sequential:
    """Return Sequential(BasicResBlock(in->out, stride), (n_blocks-1) x BasicBlockD(out->out, stride 1)).

    The BasicResBlock ignores ``conv_bias`` (always biased) and has no dropout, as in the reference; the
    BasicBlockD blocks use the plan's ``conv_bias`` and dropout.
    """
    if int(n_blocks) < 1:
        raise ValueError(f"A residual stage needs at least one block; got n_blocks={n_blocks}. Check the plan's "
                         f"n_conv_per_stage / n_blocks_per_stage / n_conv_per_stage_decoder entries.")
    kernel_size = _per_axis(conv_op, kernel_size)
    first = BasicResBlock(conv_op, input_channels, output_channels, kernel_size, stride, use_1x1conv,
                          norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
    rest = [BasicBlockD(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias, norm_op,
                        dict(norm_op_kwargs or {}), dropout_op, dropout_op_kwargs, nonlin, dict(nonlin_kwargs or {}))
            for _ in range(int(n_blocks) - 1)]
    return nn.Sequential(first, *rest)


class _NearestUpsample(torch.autograd.Function):
    """Nearest-neighbour upsampling by integer factors that keeps the map's memory format, forward and backward.

    torch's CUDA upsample_nearest3d writes a channels-last result through a contiguous temporary and returns a
    contiguous gradient, so a channels-last network gets a strided copy and mixed layouts around every decoder
    stage. Here the output is a broadcasting copy into an (B, C, D, fd, H, fh, W, fw) view of the output (one
    kernel, the output's own layout) and the gradient is the sum over the factor axes of the same view.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, factors):
        batch, channels, *spatial = x.shape
        memory_format = channels_last_format(x) if is_channels_last(x) else torch.contiguous_format
        out = torch.empty(batch, channels, *(size * factor for size, factor in zip(spatial, factors)),
                          dtype=x.dtype, device=x.device, memory_format=memory_format)
        split = [batch, channels] + [v for size, factor in zip(spatial, factors) for v in (size, factor)]
        out.view(split).copy_(x[(slice(None), slice(None)) + (slice(None), None) * len(spatial)])
        ctx.split, ctx.memory_format = split, memory_format
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        factor_axes = tuple(3 + 2 * i for i in range((len(ctx.split) - 2) // 2))
        return grad.reshape(ctx.split).sum(dim=factor_axes).contiguous(memory_format=ctx.memory_format), None


class UpsampleLayer(nn.Module):
    """Interpolate by an integer factor per axis, then a biased 1x1 conv (input -> output channels).

    Computed as the 1x1 conv first, then the interpolation: the same function (a per-voxel affine map commutes with
    nearest and linear interpolation, whose weights sum to one), on 1 / prod(scale) of the voxels, and the
    interpolation then moves output_channels (half the input's in the decoders) instead of input_channels.
    Nearest upsampling by integer factors keeps channels-last maps channels last (``_NearestUpsample``).
    """

    def __init__(self, conv_op: Type[nn.Module], input_channels: int, output_channels: int,
                 scale_factor: IntOrSeq, mode: str = "nearest"):
        super().__init__()
        self.scale_factor = tuple(float(s) for s in _per_axis(conv_op, scale_factor))
        self.mode = mode
        self.conv = conv_op(input_channels, output_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the upsampled map (B, output_channels, *S * scale)."""
        x = self.conv(x)
        if self.mode == "nearest" and all(s.is_integer() and s >= 1 for s in self.scale_factor):
            return _NearestUpsample.apply(x, tuple(int(s) for s in self.scale_factor))
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


def init_he(network: nn.Module, neg_slope: float = 1e-2, zero_residual_branch_norms: bool = False) -> nn.Module:
    """Return ``network`` after the plugin's initialisation rule for its convolutional networks.

    The rule (one for every family): a network initialises itself as the last statement of its own
    ``__init__``, so a network constructed directly is initialised exactly as it trains; builders and trainers
    never initialise. U-Mamba, LoG-VMamba and the Taming networks call this helper: nnU-Net's
    ``InitWeights_He(1e-2)`` over the whole model (Kaiming-normal weights and zero biases of every Conv /
    ConvTranspose, including the mixers' convs; Linear, norm, Mamba and frozen non-Conv parameters keep their
    own initialisation). ``zero_residual_branch_norms`` (Taming, whose encoder and decoder are nnU-Net's
    residual blocks) then zeroes the last norm of every BasicBlockD / BottleneckD branch, as nnU-Net's ResEnc
    U-Net does. Vivim follows the same rule with its papers' scheme (SegFormer / TMB init in its ``__init__``).
    Drawing the He weights after every submodule exists keeps the random stream of the reference builders.
    """
    network.apply(InitWeights_He(neg_slope))
    if zero_residual_branch_norms:
        network.apply(init_last_bn_before_add_to_0)
    return network
