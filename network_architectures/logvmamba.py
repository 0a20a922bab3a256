"""LoG-VMamba (Dang, Nguyen, Tiulpin): local and global token extractors on a U-Mamba-Enc backbone (ARCHITECTURES.md §3).

Pieces, smallest first
----------------------
- ``logvmamba_geometry``: the "even" interleave of global tokens among the spatial tokens (config
  ``depth_mode: even``), the GTX grid, and ``logvmamba_stage_specs`` / ``logvmamba_topology``: the plan ->
  per-stage roles mapping of §3.4 (the GTX grid stride t, grid size, squeeze q, number of global tokens G,
  interleave (k, r), scan channels Dseq, dt_rank R).
- ``logvmamba_mixers``: ``NeighbourUnfold`` (LTX's neighbourhood stacking), ``VSSScanMixer`` and its four forms
  (SS3D, LTX, GTX, LoG), ``VSSBlock`` and ``LoGMambaLayer`` (the per-stage wrapper, run in fp32 with autocast
  off).
- ``LoGVMamba``: stem (+ max-pool), U-Mamba-Enc stages each followed by a ``LoGMambaLayer``, a decoder with
  additive skips, a full-resolution head; one output tensor (no deep supervision).
- ``build_logvmamba(plan, deep_supervision, variant)``: the network exactly as the trainers build it.

Variants: ``"LoG"`` (roles L / LoG / G from the plan), ``"L"`` (LTX at every stage), ``"G"`` (GTX at every
stage). Everything that depends on the patch size (GTX grid, ``depth_fc`` size, interleave maps) is derived
from the plan at construction and checked again in forward with a message naming the expected size.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_pool_op

from nnunetv2_mamba.layers.memory_format import to_network_memory_format
from nnunetv2_mamba.network_architectures.blocks import BasicResBlock, UpsampleLayer, init_he, network_kwargs, residual_stage
from nnunetv2_mamba.network_architectures.logvmamba_geometry import logvmamba_topology
from nnunetv2_mamba.network_architectures.logvmamba_mixers import LoGMambaLayer
from nnunetv2_mamba.network_architectures.umamba import UMambaEncoder
from nnunetv2_mamba.plans import NetworkPlan, PlanError

logger = logging.getLogger(__name__)

__all__ = ["LoGVMambaDecoder", "LoGVMamba", "build_logvmamba"]


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------

class LoGVMambaDecoder(nn.Module):
    """Decoder with additive skips: upsample (interpolation + 1x1 conv), add the skip, residual stage.

    j = 0 is the lowest resolution. No segmentation heads: the network's head works at full resolution.
    ``deep_supervision`` exists for nnU-Net's ``set_deep_supervision_enabled`` and is ignored. The encoder is
    registered as ``decoder.encoder`` as in U-Mamba and the reference (parameters shared; counts de-duplicate).
    """

    def __init__(self, encoder: UMambaEncoder, n_conv_per_stage: Sequence[int], deep_supervision: bool = False,
                 upsample_mode: str = "trilinear"):
        super().__init__()
        n_stages = len(encoder.output_channels)
        if len(n_conv_per_stage) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage (decoder) has {len(n_conv_per_stage)} entries; with {n_stages} "
                             f"LoG stages it needs {n_stages - 1}.")
        self.encoder = encoder
        self.deep_supervision = deep_supervision
        features = encoder.output_channels
        stage_kwargs = encoder.stage_kwargs
        upsample_layers, stages = [], []
        for j in range(n_stages - 1):
            below, skip = n_stages - 1 - j, n_stages - 2 - j
            upsample_layers.append(UpsampleLayer(encoder.conv_op, features[below], features[skip],
                                                 encoder.strides[below], upsample_mode))
            stages.append(residual_stage(encoder.conv_op, features[skip], features[skip],
                                         encoder.kernel_sizes[skip], 1, n_conv_per_stage[j], **stage_kwargs))
        self.upsample_layers = nn.ModuleList(upsample_layers)
        self.stages = nn.ModuleList(stages)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the decoded map at LoG stage 0's resolution (B, F[0], *S0)."""
        x = skips[-1]
        for j, (upsample, stage) in enumerate(zip(self.upsample_layers, self.stages)):
            x = stage(upsample(x) + skips[-(j + 2)])
        return x


class LoGVMamba(nn.Module):
    """LoG-VMamba segmentation network (2D/3D) for any nnU-Net plan with n >= 3 stages (ARCHITECTURES.md §3.2, §3.4).

    Arguments are the nnU-Net plan's (``n_stages`` etc. describe the plan, not the LoG stages). ``variant``
    picks the mixers: "LoG" (L / LoG / G roles), "L" (LTX only), "G" (GTX only). Always returns one tensor
    (B, num_classes, *patch); ``decoder.deep_supervision`` exists and is ignored.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], num_classes: int, n_conv_per_stage_decoder: Sequence[int],
                 input_size: Sequence[int], conv_bias: bool = True, norm_op: Optional[Type[nn.Module]] = None,
                 norm_op_kwargs: Optional[Dict[str, Any]] = None, dropout_op: Optional[Type[nn.Module]] = None,
                 dropout_op_kwargs: Optional[Dict[str, Any]] = None, nonlin: Optional[Type[nn.Module]] = None,
                 nonlin_kwargs: Optional[Dict[str, Any]] = None, deep_supervision: bool = False,
                 variant: str = "LoG", d_state: int = 16, d_conv: int = 3, drop_path: float = 0.1,
                 backend: Optional[str] = None):
        super().__init__()
        assert len(features_per_stage) == n_stages, f"features_per_stage needs {n_stages} entries"
        topology = logvmamba_topology(input_size, features_per_stage, kernel_sizes, strides, n_blocks_per_stage,
                                      n_conv_per_stage_decoder, variant)
        dim = topology.dim
        assert convert_conv_op_to_dim(conv_op) == dim, f"conv_op {conv_op.__name__} does not fit {list(input_size)}"
        interpolation = "trilinear" if dim == 3 else "bilinear"
        self.topology, self.variant = topology, variant
        self.input_size = tuple(input_size)
        specs = topology.stages

        def make_mixer(stage: int, channels: int, map_size: Tuple[int, ...]) -> nn.Module:
            spec = specs[stage]
            assert (channels, tuple(map_size)) == (spec.channels, spec.map_size), \
                f"encoder stage {stage} ({channels} channels on {list(map_size)}) does not fit the LoG mapping"
            return LoGMambaLayer(spec, dim, d_state, d_conv, drop_path, backend)

        pool = get_matching_pool_op(conv_op, pool_type="max")
        self.encoder = UMambaEncoder(
            input_channels, topology.n_stages, list(topology.features), conv_op,
            [list(k) for k in topology.kernels], [list(s) for s in topology.strides], list(topology.encoder_blocks),
            conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
            input_size=topology.input_size, mixer_factory=make_mixer,
            stem_pool=pool(kernel_size=topology.pool_stride, stride=topology.pool_stride),
            stem_kernel_size=list(topology.stem_kernel))
        self.decoder = LoGVMambaDecoder(self.encoder, list(topology.decoder_blocks), deep_supervision,
                                        upsample_mode=interpolation)
        stem_features = topology.stem_features
        self.upsample = UpsampleLayer(conv_op, topology.features[0], stem_features, topology.pool_stride, interpolation)
        self.conv = BasicResBlock(conv_op, stem_features, stem_features, list(topology.stem_kernel), 1,
                                  use_1x1conv=False, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin,
                                  nonlin_kwargs=nonlin_kwargs)
        self.seg_layer = conv_op(stem_features, num_classes, kernel_size=1, bias=True)
        # Whole-model He init, as the reference: it also re-initialises the mixers' spatial/GTX convs; the Unfold
        # kernel is not a Conv module and stays one-hot.
        init_he(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (B, num_classes, *S) at the input resolution."""
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"LoG-VMamba was built for patch size {list(self.input_size)} but got an input of "
                             f"spatial size {list(x.shape[2:])} (its global tokens are tied to the patch size); feed "
                             f"patches of size {list(self.input_size)} (nnU-Net's predictor does) or build the "
                             f"network from a plan with the new patch size.")
        skips, stem_output = self.encoder.forward_with_stem(to_network_memory_format(x))
        decoded = self.decoder(skips)
        out = stem_output + self.upsample(decoded)
        return self.seg_layer(self.conv(out))


def build_logvmamba(plan: NetworkPlan, deep_supervision: bool = False, variant: str = "LoG",
                    backend: Optional[str] = None) -> LoGVMamba:
    """Return LoG-VMamba (variant "LoG", "L" or "G") for the plan, as the trainers build it.

    ``deep_supervision`` is stored on ``decoder.deep_supervision`` only: the network has one output.
    """
    try:
        network = LoGVMamba(
            **network_kwargs(plan, with_input_size=True), deep_supervision=deep_supervision, variant=variant,
            backend=backend)
    except ValueError as error:  # the LoG mapping of §3.4 cannot be made for this plan
        if isinstance(error, PlanError):
            raise
        raise PlanError(f"Cannot build LoG-VMamba ({variant}) from this plan: {error}") from error
    logger.debug("Built LoG-VMamba (%s) for patch %s: roles %s.", variant, plan.patch_size,
                 [spec.role for spec in network.topology.stages])
    return network
