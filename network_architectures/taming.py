"""Taming Mambas (Lumetti et al.): SegMamba, BiSegMamba, MultiSegMamba and SegMambaSkip.

All four share nnU-Net's residual-encoder U-Net (ResNet-D encoder, transposed-conv decoder, deep supervision)
and differ only in the Mamba mixer that follows every encoder stage (ARCHITECTURES.md §2):

- SegMamba: LayerNorm, then one forward ``MambaTrans`` over the C-order tokens of the stage output.
- BiSegMamba: LayerNorm, then a forward and a reversed ``MambaTrans`` (separate weights), LayerNorm(sum).
- MultiSegMamba (3D only): four axis orders, each bidirectional as in BiSegMamba, averaged; no outer LayerNorm.
- SegMambaSkip: BiSegMamba's mixer, but only on the skip connections; the main path keeps the conv features.

Plain ``torch.nn``: the constructors take explicit, already-normal arguments (nnU-Net's ``arch_kwargs`` names,
per-stage lists and per-axis kernel/stride lists as ``NetworkPlan`` gives them, checked with asserts), so the
networks work outside nnU-Net, and initialise themselves at the end of ``__init__`` (``blocks.init_he``);
``build_taming_network(name, plan, deep_supervision)`` builds one from a ``NetworkPlan``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder

from nnunetv2_mamba.layers import (BidirectionalMixer, Mamba, combine, run_in_axis_order, run_mixer,
                                   run_on_map)
from nnunetv2_mamba.layers.memory_format import to_network_memory_format
from nnunetv2_mamba.layers.norm import stream_layer_norm, token_layer_norm
from nnunetv2_mamba.network_architectures.blocks import init_he, network_kwargs
from nnunetv2_mamba.plans import NetworkPlan, PlanError


#: d_state = min(C, cap): SegMamba, BiSegMamba and SegMambaSkip cap at 256 (the CUDA kernel limit), Multi at 64.
D_STATE_CAP = 256
MULTI_D_STATE_CAP = 64

#: MultiSegMamba's scan orders (spatial axes, slowest first): items 0, 1, 2 and 4 of
#: itertools.permutations((0, 1, 2)), as in the reference.
MULTI_AXIS_ORDERS: Tuple[Tuple[int, int, int], ...] = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 0, 1))

class MambaTrans(nn.Module):
    """Pre-norm Mamba block with a linear head on tokens: h + Mamba(LN(h)), then + Linear(LN(.))."""

    def __init__(self, channels: int, d_state_cap: int = D_STATE_CAP, mamba_backend: Optional[str] = None):
        super().__init__()
        self.mamba = Mamba(d_model=channels, d_state=min(channels, d_state_cap), d_conv=4, expand=2,
                           backend=mamba_backend)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the mixed tokens (B, L, C)."""
        # Both norms feed projections only: on the GPU they write their tokens in the autocast dtype (bf16 under the
        # bf16 mixer policy), what the projection would cast them to; the residual stream keeps its dtype.
        tokens = tokens + self.mamba(token_layer_norm(tokens.transpose(1, 2), self.norm1))
        return tokens + self.head(token_layer_norm(tokens.transpose(1, 2), self.norm2))


def pan_mamba_trans(channels: int, d_state_cap: int = D_STATE_CAP,
                    mamba_backend: Optional[str] = None) -> BidirectionalMixer:
    """Return the reference's PanMambaTrans: LayerNorm(fwd MambaTrans(h) + reversed bwd MambaTrans(h))."""
    return BidirectionalMixer(MambaTrans(channels, d_state_cap, mamba_backend),
                              MambaTrans(channels, d_state_cap, mamba_backend), nn.LayerNorm(channels))


class MambaLayer(nn.Module):
    """Stage mixer of SegMamba/BiSegMamba/SegMambaSkip: LayerNorm on the C-order tokens, then a token mixer.

    The token mixer's output replaces the features (no residual around the layer; the residual inside
    MambaTrans is around the normalised tokens, as in the reference). Runs in the mixer precision (§0.6).
    """

    def __init__(self, channels: int, token_mixer: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = token_mixer

    def _mix_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # This norm starts MambaTrans's residual stream: fp32 under autocast, as torch's LayerNorm gives.
        return self.mamba(stream_layer_norm(tokens.transpose(1, 2), self.norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mixed feature map (B, C, *S) in the mixer precision (§0.6)."""
        return run_mixer(lambda features: run_on_map(self._mix_tokens, features), x)


class MultiMambaTrans(nn.Module):
    """MultiSegMamba stage mixer: one bidirectional PanMambaTrans per 3D axis order, outputs averaged.

    Applied directly to the stage output (no outer LayerNorm). ``mixer_fp32=False`` keeps the reference's
    behaviour of running under the trainer's autocast (the scan state still accumulates in fp32);
    ``True`` runs the whole mixer in the plugin's mixer precision (fp32, or bf16 on a bf16 GPU; §0.6) like
    the other Taming networks.
    """

    def __init__(self, channels: int, axis_orders: Sequence[Sequence[int]] = MULTI_AXIS_ORDERS,
                 d_state_cap: int = MULTI_D_STATE_CAP, mixer_fp32: bool = False,
                 mamba_backend: Optional[str] = None):
        super().__init__()
        self.axis_orders = [tuple(int(a) for a in order) for order in axis_orders]
        self.mixer_fp32 = bool(mixer_fp32)
        self.mambas = nn.ModuleList(pan_mamba_trans(channels, d_state_cap, mamba_backend)
                                    for _ in self.axis_orders)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [run_in_axis_order(mixer, x, order) for mixer, order in zip(self.mambas, self.axis_orders)]
        return combine(outputs, "mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mean of the per-order bidirectional mixes of x (B, C, *S)."""
        if x.dim() - 2 != len(self.axis_orders[0]):
            raise ValueError(f"MultiMambaTrans was built for {len(self.axis_orders[0])}D maps; got input of shape "
                             f"{tuple(x.shape)}.")
        return run_mixer(self._mix, x) if self.mixer_fp32 else self._mix(x)


class TamingEncoder(nn.Module):
    """Residual encoder (stem + StackedResidualBlocks per stage) with a Mamba mixer after every stage.

    ``mixers_on_skips_only=False`` (SegMamba/Bi/Multi): the mixer output continues down the encoder and is the
    skip. ``True`` (SegMambaSkip): the main path continues with the conv features; only the skips (and the
    bottleneck the decoder starts from) are mixed. Exposes the metadata nnU-Net's UNetResDecoder reads.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], conv_bias: bool, norm_op: Optional[Type[nn.Module]],
                 norm_op_kwargs: Optional[dict], dropout_op: Optional[Type[nn.Module]],
                 dropout_op_kwargs: Optional[dict], nonlin: Optional[Type[nn.Module]],
                 nonlin_kwargs: Optional[dict], mixer_factory: Callable[[int], nn.Module],
                 mixers_on_skips_only: bool = False):
        super().__init__()
        self.stem = StackedConvBlocks(1, conv_op, input_channels, features_per_stage[0], kernel_sizes[0], 1,
                                      conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
                                      nonlin_kwargs)
        stages, mixers = [], []
        channels = features_per_stage[0]
        for stage in range(n_stages):
            stages.append(StackedResidualBlocks(
                n_blocks_per_stage[stage], conv_op, channels, features_per_stage[stage], kernel_sizes[stage],
                strides[stage], conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
                nonlin_kwargs, block=BasicBlockD))
            channels = features_per_stage[stage]
            mixers.append(mixer_factory(channels))
        self.stages = nn.ModuleList(stages)
        self.mamba_layers = nn.ModuleList(mixers)
        self.mixers_on_skips_only = bool(mixers_on_skips_only)

        # Read by UNetResDecoder (private copies: never alias the caller's lists).
        self.output_channels = [int(f) for f in features_per_stage]
        self.strides = [[int(s) for s in stride] for stride in strides]
        self.kernel_sizes = [[int(k) for k in kernel] for kernel in kernel_sizes]
        self.conv_op = conv_op
        self.conv_bias = conv_bias
        self.norm_op = norm_op
        self.norm_op_kwargs = dict(norm_op_kwargs or {})
        self.dropout_op = dropout_op
        self.dropout_op_kwargs = dict(dropout_op_kwargs or {})
        self.nonlin = nonlin
        self.nonlin_kwargs = dict(nonlin_kwargs or {})

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Return the skips of every stage, highest resolution first (the last one is the bottleneck)."""
        x = self.stem(x)
        skips = []
        for stage, mixer in zip(self.stages, self.mamba_layers):
            x = stage(x)
            if self.mixers_on_skips_only:
                skips.append(mixer(x))
            else:
                x = mixer(x)
                skips.append(x)
        return skips


class TamingMambaUNet(nn.Module):
    """Residual U-Net with Taming-Mambas mixers; subclasses choose the mixer (``mixer_type``) and wiring."""

    #: "forward" (SegMamba), "bidirectional" (BiSegMamba, SegMambaSkip) or "multi_axis" (MultiSegMamba).
    mixer_type: Optional[str] = None
    #: True for SegMambaSkip: mixers only on the skip connections.
    mixers_on_skips_only: bool = False
    #: d_state = min(C, d_state_cap).
    d_state_cap: int = D_STATE_CAP
    #: Spatial dimensionalities the mixer supports.
    supported_dims: Tuple[int, ...] = (2, 3)
    #: Default of ``mixer_fp32`` (only MultiSegMamba lets its mixers run under autocast, as the reference).
    default_mixer_fp32: bool = True
    #: Appended to dimension errors: what to use instead.
    dimension_hint: str = ""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], num_classes: int, n_conv_per_stage_decoder: Sequence[int],
                 conv_bias: bool = True,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, mixer_fp32: Optional[bool] = None,
                 mamba_backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        if self.mixer_type not in ("forward", "bidirectional", "multi_axis"):
            raise TypeError(f"{name} does not define a mixer; use SegMamba, BiSegMamba, MultiSegMamba or "
                            "SegMambaSkip.")
        dim = convert_conv_op_to_dim(conv_op)
        assert dim in self.supported_dims, f"{name} supports {self.supported_dims}D networks; got {conv_op.__name__}"
        assert n_stages >= 2, f"{name} needs n_stages >= 2 (a U-Net with at least one skip); got {n_stages}"
        for key, values in (("features_per_stage", features_per_stage), ("kernel_sizes", kernel_sizes),
                            ("strides", strides), ("n_blocks_per_stage", n_blocks_per_stage)):
            assert len(values) == n_stages, f"{key} needs one entry per stage ({n_stages}); got {values}"
        assert len(n_conv_per_stage_decoder) == n_stages - 1, \
            f"n_conv_per_stage_decoder needs {n_stages - 1} entries; got {n_conv_per_stage_decoder}"

        self.dim = dim
        self.input_channels = input_channels
        self.mixer_fp32 = self.default_mixer_fp32 if mixer_fp32 is None else bool(mixer_fp32)
        self.encoder = TamingEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                     n_blocks_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                     dropout_op_kwargs, nonlin, nonlin_kwargs, self._mixer_factory(mamba_backend),
                                     self.mixers_on_skips_only)
        # nnU-Net's residual decoder (transposed convs, StackedResidualBlocks, seg_layers built regardless of DS
        # so state_dict keys do not depend on it). It keeps a reference to the encoder (nnU-Net convention).
        self.decoder = UNetResDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)
        # nnU-Net's ResEnc init: He, then each residual branch's last norm zeroed (there is none without norms).
        init_he(self, zero_residual_branch_norms=norm_op is not None)

    def _mixer_factory(self, mamba_backend: Optional[str]) -> Callable[[int], nn.Module]:
        """Return channels -> stage mixer for this network's mixer type."""
        cap = self.d_state_cap
        if self.mixer_type == "forward":
            return lambda channels: MambaLayer(channels, MambaTrans(channels, cap, mamba_backend))
        if self.mixer_type == "bidirectional":
            return lambda channels: MambaLayer(channels, pan_mamba_trans(channels, cap, mamba_backend))
        return lambda channels: MultiMambaTrans(channels, MULTI_AXIS_ORDERS, cap, self.mixer_fp32, mamba_backend)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Return logits: a list highest resolution first with deep supervision, else one full-size map."""
        if x.dim() != self.dim + 2 or x.shape[1] != self.input_channels:
            raise ValueError(f"{type(self).__name__} expects input (B, {self.input_channels}, "
                             f"{', '.join(['S'] * self.dim)}); got shape {tuple(x.shape)}.")
        return self.decoder(self.encoder(to_network_memory_format(x)))


class SegMamba(TamingMambaUNet):
    """Taming-Mambas SegMamba: one forward Mamba (MambaTrans, d_state min(C, 256)) after every stage."""

    mixer_type = "forward"


class BiSegMamba(TamingMambaUNet):
    """Taming-Mambas BiSegMamba (reference PanSegMamba): forward + reversed MambaTrans, LayerNorm(sum)."""

    mixer_type = "bidirectional"


class MultiSegMamba(TamingMambaUNet):
    """Taming-Mambas MultiSegMamba (3D): 4 axis orders x (forward + reversed), averaged; d_state min(C, 64)."""

    mixer_type = "multi_axis"
    d_state_cap = MULTI_D_STATE_CAP
    supported_dims = (3,)
    dimension_hint = ("Its mixer scans four orders of the three spatial axes; use a 3d_fullres/3d_lowres "
                      "configuration, or SegMamba/BiSegMamba/SegMambaSkip for 2D.")
    default_mixer_fp32 = False  # the reference runs these mixers under the trainer's fp16 autocast


class SegMambaSkip(TamingMambaUNet):
    """Taming-Mambas SegMambaSkip: BiSegMamba's mixer on the skip connections only."""

    mixer_type = "bidirectional"
    mixers_on_skips_only = True


TAMING_NETWORKS: Dict[str, Type[TamingMambaUNet]] = {
    "SegMamba": SegMamba, "BiSegMamba": BiSegMamba, "MultiSegMamba": MultiSegMamba, "SegMambaSkip": SegMambaSkip}


def build_taming_network(name: str, plan: NetworkPlan, deep_supervision: bool, **options) -> TamingMambaUNet:
    """Return the Taming network ``name`` for an nnU-Net plan (``options``: mixer_fp32, mamba_backend)."""
    if name not in TAMING_NETWORKS:
        raise ValueError(f"Unknown Taming network {name!r}; choose one of {sorted(TAMING_NETWORKS)}.")
    network_class = TAMING_NETWORKS[name]
    plan.require_dim(network_class.supported_dims, name, network_class.dimension_hint)
    if plan.n_stages < 2:
        raise PlanError(f"The plan cannot build {name}: it needs n_stages >= 2 (a U-Net with at least one skip); "
                        f"got {plan.n_stages}. Use a larger patch size so that nnU-Net plans more stages.")
    return network_class(**network_kwargs(plan), deep_supervision=deep_supervision, **options)
