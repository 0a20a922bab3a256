"""U-Mamba (Ma et al.): U-Mamba-Enc and U-Mamba-Bot, 2D and 3D, built from nnU-Net plans (ARCHITECTURES.md §1).

Networks
--------
- ``UMambaEnc``: residual encoder with a ``UMambaLayer`` after every stage (3D) or after alternating stages
  (2D), residual decoder with interpolation upsampling and 1x1 seg heads (deep supervision).
- ``UMambaBot``: the same encoder without mixers, one patch-token ``UMambaLayer`` on the bottleneck.
- ``build_umamba_enc(plan, deep_supervision)`` / ``build_umamba_bot(...)``: the networks exactly as the
  trainers build them from a ``nnunetv2_mamba.plans.NetworkPlan`` (which validated the plan).

Constructors take already-normal arguments (per-stage int lists, per-axis kernel/stride lists, as
``NetworkPlan`` gives them) and check them with asserts; each network He-initialises itself at the end of its
``__init__`` (``blocks.init_he``), so a directly constructed network is initialised as it trains.

Reusable backbone API (used by other families, e.g. LoG-VMamba)
----------------------------------------------------------------
- ``umamba_block_counts(n_blocks_per_stage, n_conv_per_stage_decoder) -> (encoder_counts, decoder_counts)``:
  U-Mamba's block-count override on new lists (the arguments are never modified); the number of stages is
  ``len(n_blocks_per_stage)``; decoder index 0 is the lowest-resolution decoder stage.
- ``stage_feature_map_sizes(input_size, strides)``: map size of every stage, ``input_size // cumprod(strides)``.
- ``UMambaEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
  n_blocks_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
  input_size, mixer_factory=None, stem_pool=None, return_skips=True, stem_kernel_size=None)`` (not
  initialised: the network that owns it initialises the whole model):
  ``stem`` (BasicResBlock + BasicBlockD at the input resolution, kernel ``stem_kernel_size`` or stage 0's), optional ``stem_pool`` module applied after the
  stem, then ``stages[s]`` (``residual_stage``: BasicResBlock with the stage stride + BasicBlockD blocks) each
  followed by ``mamba_layers[s] = mixer_factory(s, features_per_stage[s], feature_map_size_s)``, a module on
  (B, C, *S) maps (``nn.Identity()`` for none). ``input_size`` is the spatial size of the tensor entering
  stage 0 (after ``stem_pool``), used only to tell the factory each stage's map size. Without a factory the
  encoder has no ``mamba_layers`` attribute. ``forward(x)`` returns the skips (highest resolution first);
  ``forward_with_stem(x)`` returns ``(skips, stem_output)``.
- ``UMambaDecoder(encoder, num_classes, n_conv_per_stage, deep_supervision, upsample_mode="nearest",
  use_full_resolution_skip=True)``: ``upsample_layers[j]`` (UpsampleLayer), ``stages[j]`` (residual_stage on the
  concatenated [up, skip]), ``seg_layers[j]`` (1x1 conv), j = 0 at the lowest resolution.
- ``UMambaLayer(dim, d_state=16, d_conv=4, expand=2, channel_token=False, backend=None)``: LayerNorm + Mamba on
  patch tokens (d = C) or channel tokens (d = prod(S)), always in fp32 (autocast off).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn as nn

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_mamba.layers import Mamba, from_tokens, run_mixer
from nnunetv2_mamba.layers.memory_format import is_channels_last, to_network_memory_format
from nnunetv2_mamba.layers.norm import token_layer_norm
from nnunetv2_mamba.network_architectures.blocks import UpsampleLayer, init_he, network_kwargs, residual_stage
from nnunetv2_mamba.plans import NetworkPlan, PlanError

logger = logging.getLogger(__name__)

#: mixer_factory(stage_index, channels, feature_map_size) -> module on (B, C, *S) maps.
MixerFactory = Callable[[int, int, Tuple[int, ...]], nn.Module]

__all__ = ["UMambaLayer", "UMambaEncoder", "UMambaDecoder", "UMambaEnc", "UMambaBot", "umamba_block_counts",
           "stage_feature_map_sizes", "umamba_2d_mixer_stages",
           "umamba_enc_mixer_factory", "build_umamba_enc", "build_umamba_bot"]


# ----------------------------------------------------------------------------------------------------------
# Rules of the reference, as small public functions
# ----------------------------------------------------------------------------------------------------------

def umamba_block_counts(n_blocks_per_stage: Sequence[int],
                        n_conv_per_stage_decoder: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Return new (encoder, decoder) block-count lists with U-Mamba's override (one block in the deeper half).

    With n = len(n_blocks_per_stage): encoder stages s >= ceil(n/2) get 1 block; decoder stages j with
    ceil((n-1)/2 + 0.5) <= j <= n-2 get 1 block (j = 0 is the lowest-resolution decoder stage, so the
    highest-resolution decoder stages are the ones shortened). The inputs are not modified.
    """
    encoder_counts = [int(v) for v in n_blocks_per_stage]
    decoder_counts = [int(v) for v in n_conv_per_stage_decoder]
    n_stages = len(encoder_counts)
    if len(decoder_counts) != n_stages - 1:
        raise ValueError(f"n_conv_per_stage_decoder has {len(decoder_counts)} entries; with {n_stages} encoder "
                         f"stages it needs {n_stages - 1}.")
    for s in range(math.ceil(n_stages / 2), n_stages):
        encoder_counts[s] = 1
    for j in range(math.ceil((n_stages - 1) / 2 + 0.5), n_stages - 1):
        decoder_counts[j] = 1
    return encoder_counts, decoder_counts


def stage_feature_map_sizes(input_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Return the spatial size after every stage: input_size // cumulative stride (per axis, floor)."""
    sizes, current = [], [int(v) for v in input_size]
    for stride in strides:
        current = [c // int(s) for c, s in zip(current, stride)]
        sizes.append(tuple(current))
    return sizes


def _uses_channel_tokens(channels: int, feature_map_size: Sequence[int]) -> bool:
    """Return True when a stage map has no more positions than channels (the reference's rule, §1.2)."""
    return int(np.prod(feature_map_size)) <= int(channels)


def umamba_2d_mixer_stages(n_stages: int) -> List[bool]:
    """Return per stage whether 2D U-Mamba-Enc has a mixer: (s odd) XOR (n odd), always incl. the last stage."""
    return [(s % 2 == 1) != (n_stages % 2 == 1) for s in range(n_stages)]


# ----------------------------------------------------------------------------------------------------------
# Mixer
# ----------------------------------------------------------------------------------------------------------

class UMambaLayer(nn.Module):
    """LayerNorm + forward Mamba on a (B, C, *S) map; the output replaces the features (no residual).

    Patch-token mode: tokens are spatial positions (C order), d_model = C. Channel-token mode: tokens are the
    C channels and each token is the channel's flattened map, d_model = prod(S) (tied to the patch size).
    The whole layer runs in the mixer precision (fp32, or bf16 autocast on a bf16 GPU), never under fp16, because
    Mamba overflows in fp16 (ARCHITECTURES.md §0.6, §6.4).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, channel_token: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        self.dim = int(dim)  # a Python int even when computed with numpy (channel tokens)
        self.channel_token = bool(channel_token)
        self.norm = nn.LayerNorm(self.dim)
        self.mamba = Mamba(d_model=self.dim, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)

    def _mix_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return Mamba(LayerNorm(tokens)) for tokens (B, L, dim)."""
        return self.mamba(self.norm(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mixed map, same shape as ``x`` (fp32, or bf16 under the bf16 mixer policy)."""
        return run_mixer(self._mix_map, x)

    def _mix_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mixed map for ``x`` in the mixer precision (patch or channel tokens)."""
        if not self.channel_token:
            # Same as run_on_map(self._mix_tokens, x), without the transposing copies on the GPU: the LayerNorm
            # reads the map and writes tokens; the out projection writes the map (channel-major), or, for a
            # channels-last map, tokens, which are that map's memory layout.
            tokens = token_layer_norm(x.flatten(2), self.norm)
            if is_channels_last(x):
                return from_tokens(self.mamba(tokens), x.shape[2:])
            return self.mamba(tokens, channels_first=True).view(x.shape[0], -1, *x.shape[2:])
        batch, channels, *spatial = x.shape
        n_positions = int(np.prod(spatial))
        if n_positions != self.dim:
            raise ValueError(f"This channel-token U-Mamba layer was built for feature maps of {self.dim} "
                             f"positions (set by the configuration's patch size); got a map of size "
                             f"{list(spatial)}. Feed patches of the configuration's patch size (nnU-Net's "
                             f"predictor does).")
        # Channels are the tokens: (B, C, *S) -> (B, C, prod(S)) is already (B, L=C, d=prod(S)).
        mixed = self._mix_tokens(x.reshape(batch, channels, n_positions))
        return mixed.reshape(batch, channels, *spatial)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, channel_token={self.channel_token}"


def umamba_enc_mixer_factory(dim: int, n_stages: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                             backend: Optional[str] = None) -> MixerFactory:
    """Return U-Mamba-Enc's mixer factory: a UMambaLayer per stage (2D: alternating), channel-token rule applied."""
    has_mixer = umamba_2d_mixer_stages(n_stages) if dim == 2 else [True] * n_stages

    def make_mixer(stage: int, channels: int, feature_map_size: Tuple[int, ...]) -> nn.Module:
        if not has_mixer[stage]:
            return nn.Identity()
        if _uses_channel_tokens(channels, feature_map_size):
            return UMambaLayer(int(np.prod(feature_map_size)), d_state, d_conv, expand, channel_token=True, backend=backend)
        return UMambaLayer(channels, d_state, d_conv, expand, channel_token=False, backend=backend)

    return make_mixer


# ----------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------------------

class UMambaEncoder(nn.Module):
    """Residual encoder: stem, then per stage a strided residual stage followed by an injectable mixer."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], conv_bias: bool = True,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[Dict[str, Any]] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[Dict[str, Any]] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[Dict[str, Any]] = None,
                 input_size: Optional[Sequence[int]] = None, mixer_factory: Optional[MixerFactory] = None,
                 stem_pool: Optional[nn.Module] = None, return_skips: bool = True,
                 stem_kernel_size: Optional[Sequence[int]] = None):
        super().__init__()
        for name, values in (("features_per_stage", features_per_stage), ("kernel_sizes", kernel_sizes),
                             ("strides", strides), ("n_blocks_per_stage", n_blocks_per_stage)):
            assert len(values) == n_stages, f"{name} needs one entry per stage ({n_stages}); got {values}"
        # Private copies: plan lists are never kept or modified (nnU-Net caches configurations).
        self.output_channels = [int(c) for c in features_per_stage]
        self.kernel_sizes = [[int(k) for k in kernel] for kernel in kernel_sizes]
        self.strides = [[int(s) for s in stride] for stride in strides]
        self.conv_op = conv_op
        self.conv_bias = conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, dict(norm_op_kwargs or {})
        self.dropout_op, self.dropout_op_kwargs = dropout_op, (dict(dropout_op_kwargs) if dropout_op_kwargs else None)
        self.nonlin, self.nonlin_kwargs = nonlin, dict(nonlin_kwargs or {})
        self.return_skips = return_skips
        # Block options shared with decoders built on this encoder (they read them from here).
        self.stage_kwargs = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=self.norm_op_kwargs,
                                 dropout_op=dropout_op, dropout_op_kwargs=self.dropout_op_kwargs, nonlin=nonlin,
                                 nonlin_kwargs=self.nonlin_kwargs)
        stage_kwargs = self.stage_kwargs

        # The stem uses stage 0's kernel unless told otherwise (LoG-VMamba's stem takes the plan's K[0] while its
        # first mixer stage takes K[1]).
        stem_kernel = self.kernel_sizes[0] if stem_kernel_size is None else [int(k) for k in stem_kernel_size]
        self.stem = residual_stage(conv_op, input_channels, self.output_channels[0], stem_kernel, 1,
                                   n_blocks_per_stage[0], **stage_kwargs)
        self.stem_pool = stem_pool
        stages, previous = [], self.output_channels[0]
        for s in range(n_stages):
            stages.append(residual_stage(conv_op, previous, self.output_channels[s], self.kernel_sizes[s],
                                         self.strides[s], n_blocks_per_stage[s], **stage_kwargs))
            previous = self.output_channels[s]
        self.stages = nn.ModuleList(stages)

        self.input_size = None if input_size is None else tuple(int(v) for v in input_size)
        self.feature_map_sizes = None
        if self.input_size is not None:
            self.feature_map_sizes = stage_feature_map_sizes(self.input_size, self.strides)
        if mixer_factory is not None:
            # Mixers are sized from each stage's feature map, so they need the size entering stage 0.
            assert self.feature_map_sizes is not None, "UMambaEncoder needs input_size with a mixer_factory"
            self.mamba_layers = nn.ModuleList(
                [mixer_factory(s, self.output_channels[s], self.feature_map_sizes[s]) for s in range(n_stages)])

    def forward_with_stem(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Return (per-stage outputs highest resolution first, stem output before ``stem_pool``)."""
        stem_output = self.stem(x)
        x = stem_output if self.stem_pool is None else self.stem_pool(stem_output)
        mixers = getattr(self, "mamba_layers", None)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if mixers is not None:
                x = mixers[s](x)
            skips.append(x)
        return skips, stem_output

    def forward(self, x: torch.Tensor):
        """Return the per-stage outputs (highest resolution first), or only the last if not return_skips."""
        skips, _ = self.forward_with_stem(x)
        return skips if self.return_skips else skips[-1]


class UMambaDecoder(nn.Module):
    """Residual decoder: interpolation upsampling, concatenated skips, residual stages, 1x1 seg heads.

    ``seg_layers`` exist for every decoder stage whether or not deep supervision is on, so state_dict keys do
    not depend on it. The encoder is registered as ``decoder.encoder`` (nnU-Net and reference convention:
    checkpoint keys match the reference; parameters are shared, so counts de-duplicate).
    """

    def __init__(self, encoder: UMambaEncoder, num_classes: int, n_conv_per_stage: Sequence[int],
                 deep_supervision: bool, upsample_mode: str = "nearest", use_full_resolution_skip: bool = True):
        super().__init__()
        n_stages = len(encoder.output_channels)
        assert len(n_conv_per_stage) == n_stages - 1, \
            f"n_conv_per_stage (decoder) needs {n_stages - 1} entries; got {n_conv_per_stage}"
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.deep_supervision = deep_supervision
        self.use_full_resolution_skip = use_full_resolution_skip
        features = encoder.output_channels
        stage_kwargs = encoder.stage_kwargs
        upsample_layers, stages, seg_layers = [], [], []
        for j in range(n_stages - 1):
            below, skip = n_stages - 1 - j, n_stages - 2 - j
            upsample_layers.append(UpsampleLayer(encoder.conv_op, features[below], features[skip],
                                                 encoder.strides[below], upsample_mode))
            # The 2D reference does not concatenate the full-resolution skip in its last decoder stage.
            concatenates = use_full_resolution_skip or j < n_stages - 2
            stage_input = 2 * features[skip] if concatenates else features[skip]
            stages.append(residual_stage(encoder.conv_op, stage_input, features[skip], encoder.kernel_sizes[skip],
                                         1, n_conv_per_stage[j], **stage_kwargs))
            seg_layers.append(encoder.conv_op(features[skip], num_classes, kernel_size=1, bias=True))
        self.upsample_layers = nn.ModuleList(upsample_layers)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: Sequence[torch.Tensor]):
        """Return full-resolution logits, or (deep supervision) a list of logits highest resolution first."""
        x = skips[-1]
        n_decoder_stages = len(self.stages)
        seg_outputs = []
        for j in range(n_decoder_stages):
            x = self.upsample_layers[j](x)
            if self.use_full_resolution_skip or j < n_decoder_stages - 1:
                x = torch.cat((x, skips[-(j + 2)]), dim=1)
            x = self.stages[j](x)
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[j](x))
            elif j == n_decoder_stages - 1:
                seg_outputs.append(self.seg_layers[-1](x))
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------

def _umamba_dim(n_stages: int, conv_op: Type[nn.Module], input_size: Sequence[int]) -> int:
    """Return the spatial dimension after asserting the arguments shared by U-Mamba-Enc and -Bot."""
    assert n_stages >= 2, f"U-Mamba needs at least 2 stages (one decoder stage); got n_stages={n_stages}"
    dim = convert_conv_op_to_dim(conv_op)
    assert len(input_size) == dim, f"input_size {list(input_size)} does not fit {conv_op.__name__}"
    return dim


def _check_input_size(network: str, x: torch.Tensor, encoder: "UMambaEncoder", size_tied: bool) -> None:
    """Raise one clear ValueError for an input the network cannot take (instead of a torch error deep inside).

    Every network needs each spatial axis divisible by the encoder's total stride (else the decoder's skip
    concatenation fails); one with channel-token mixers also needs the exact patch size it was built for
    (d_model = prod(S) of the stage map, and a same-count map of another shape would silently scramble it).
    """
    spatial = [int(v) for v in x.shape[2:]]
    patch = list(encoder.input_size)
    if size_tied and spatial != patch:
        raise ValueError(f"{network} was built for patch size {patch} (its channel-token Mamba layers are sized "
                         f"from it) but got an input of spatial size {spatial}; feed patches of size {patch} "
                         f"(nnU-Net's predictor does) or build the network from a plan with the new patch size.")
    total_stride = [int(np.prod([stride[axis] for stride in encoder.strides])) for axis in range(len(patch))]
    if len(spatial) == len(patch) and any(size % stride for size, stride in zip(spatial, total_stride)):
        raise ValueError(f"{network} needs an input whose spatial size is divisible by its total stride "
                         f"{total_stride}; got spatial size {spatial} (built for patch size {patch}). Pad or crop "
                         f"the input to a multiple of {total_stride}, or use the plan's patch size.")


class UMambaEnc(nn.Module):
    """U-Mamba-Enc: a UMambaLayer after every encoder stage (2D: alternating stages, skip-less last decoder)."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], num_classes: int, n_conv_per_stage_decoder: Sequence[int],
                 input_size: Sequence[int], conv_bias: bool = True,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[Dict[str, Any]] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[Dict[str, Any]] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[Dict[str, Any]] = None,
                 deep_supervision: bool = False, d_state: int = 16, backend: Optional[str] = None):
        super().__init__()
        dim = _umamba_dim(n_stages, conv_op, input_size)
        encoder_counts, decoder_counts = umamba_block_counts(n_blocks_per_stage, n_conv_per_stage_decoder)
        self.encoder = UMambaEncoder(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, encoder_counts, conv_bias,
            norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, input_size=input_size,
            mixer_factory=umamba_enc_mixer_factory(dim, n_stages, d_state=d_state, backend=backend))
        self.decoder = UMambaDecoder(self.encoder, num_classes, decoder_counts, deep_supervision,
                                     use_full_resolution_skip=(dim == 3))
        # A plain attribute, not a buffer: state_dict keys stay as they were.
        self.size_tied = any(getattr(m, "channel_token", False) for m in self.encoder.mamba_layers)
        init_he(self)

    def forward(self, x: torch.Tensor):
        """Return logits (B, classes, *S), or a list highest resolution first with deep supervision."""
        _check_input_size("U-Mamba-Enc", x, self.encoder, self.size_tied)
        return self.decoder(self.encoder(to_network_memory_format(x)))


class UMambaBot(nn.Module):
    """U-Mamba-Bot: residual U-Net with one patch-token UMambaLayer on the bottleneck (no residual)."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], num_classes: int, n_conv_per_stage_decoder: Sequence[int],
                 input_size: Sequence[int], conv_bias: bool = True,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[Dict[str, Any]] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[Dict[str, Any]] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[Dict[str, Any]] = None,
                 deep_supervision: bool = False, d_state: int = 16, backend: Optional[str] = None):
        super().__init__()
        dim = _umamba_dim(n_stages, conv_op, input_size)
        encoder_counts, decoder_counts = umamba_block_counts(n_blocks_per_stage, n_conv_per_stage_decoder)
        self.encoder = UMambaEncoder(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, encoder_counts, conv_bias,
            norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, input_size=input_size)
        self.decoder = UMambaDecoder(self.encoder, num_classes, decoder_counts, deep_supervision,
                                     use_full_resolution_skip=(dim == 3))
        # Always patch tokens, even when the bottleneck has fewer positions than channels (as the reference).
        self.mamba_layer = UMambaLayer(features_per_stage[-1], d_state=d_state, channel_token=False, backend=backend)
        init_he(self)

    def forward(self, x: torch.Tensor):
        """Return logits (B, classes, *S), or a list highest resolution first with deep supervision."""
        _check_input_size("U-Mamba-Bot", x, self.encoder, size_tied=False)  # patch tokens: any divisible size
        skips = self.encoder(to_network_memory_format(x))
        skips[-1] = self.mamba_layer(skips[-1])
        return self.decoder(skips)


# ----------------------------------------------------------------------------------------------------------
# Builders from a NetworkPlan (what the trainers and benchmarks call)
# ----------------------------------------------------------------------------------------------------------

def _network_from_plan(network_class, plan: NetworkPlan, deep_supervision: bool, backend: Optional[str]):
    """Return ``network_class`` built from the plan's arguments (it He-initialises itself)."""
    if plan.n_stages < 2:
        raise PlanError(f"U-Mamba needs a plan with at least 2 stages; this plan has n_stages={plan.n_stages}. "
                        f"Use a larger patch size so that nnU-Net plans more stages.")
    network = network_class(**network_kwargs(plan, with_input_size=True), deep_supervision=deep_supervision,
                            backend=backend)
    logger.debug("Built %s for patch %s with %d stages.", network_class.__name__, plan.patch_size, plan.n_stages)
    return network


def build_umamba_enc(plan: NetworkPlan, deep_supervision: bool, backend: Optional[str] = None) -> UMambaEnc:
    """Return U-Mamba-Enc for the plan, exactly as nnUNetTrainerUMambaEnc builds it."""
    return _network_from_plan(UMambaEnc, plan, deep_supervision, backend)


def build_umamba_bot(plan: NetworkPlan, deep_supervision: bool, backend: Optional[str] = None) -> UMambaBot:
    """Return U-Mamba-Bot for the plan, exactly as nnUNetTrainerUMambaBot builds it."""
    return _network_from_plan(UMambaBot, plan, deep_supervision, backend)
