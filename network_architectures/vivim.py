"""Vivim: video vision Mamba for medical video object segmentation (ARCHITECTURES.md §4; Yang, Xing, Zhu).

A clip (B, Cin, T, H, W) is segmented frame by frame by a MiT-B3 (SegFormer) encoder whose four stages are each
followed by Temporal Mamba Blocks (TMB) that mix the whole clip as one frame-major token sequence of length
T*h*w; a SegFormer all-MLP head fuses the four levels at 1/4 resolution and predicts every frame.

Two mixers are available inside the TMB layers:

* ``"alternating"`` (default, ``nnUNetTrainerVivim``): the seed paper's plain unidirectional Mamba whose scan
  runs over frames 1..T in even layers and T..1 in odd layers (order inside a frame unchanged);
* ``"st_v3"`` (``nnUNetTrainerVivimV3``): the released code's ST-Mamba v3 with shared in/out projections and
  three scan branches (forward, reversed, frame-interleaved) averaged before ``out_proj``.

Every scan goes through the core ``Mamba`` layer / ``selective_scan`` and the token-order helpers.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.regularization import DropPath

from nnunetv2_mamba.layers import (Mamba, combine, frame_deinterleave, frame_interleave, from_tokens,
                                   run_frames_reversed, run_in_fp32, run_reversed, to_tokens)
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.ssm import selective_scan

logger = logging.getLogger(__name__)

#: MiT-B3 hyper-parameters (SegFormer-B3), per encoder stage.
MIT_B3 = {
    "embed_dims": (64, 128, 320, 512),
    "mit_depths": (3, 4, 18, 3),
    "num_heads": (1, 2, 5, 8),
    "sr_ratios": (8, 4, 2, 1),
    "patch_sizes": (7, 3, 3, 3),
    "patch_strides": (4, 2, 2, 2),
}
TMB_DEPTHS = (2, 2, 2, 2)
DECODER_DIM = 768
MIXERS = ("alternating", "st_v3")


# ---------------------------------------------------------------------------------------------------------------
# MiT (SegFormer) encoder pieces, applied to every frame independently
# ---------------------------------------------------------------------------------------------------------------

class OverlapPatchEmbedding(nn.Module):
    """Overlapping patch embedding: strided Conv2d (padding k//2) then LayerNorm on the tokens."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2, bias=True)
        self.layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Return (tokens (N, h*w, C), h, w) of frames (N, Cin, H, W)."""
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.layer_norm(to_tokens(x)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a map reduced by a strided conv (ratio sr)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MiT stage width {dim} is not divisible by its number of heads {num_heads}.")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim, bias=True)
        self.key = nn.Linear(dim, dim, bias=True)
        self.value = nn.Linear(dim, dim, bias=True)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:  # created only when used, so that there are no unused parameters at sr = 1
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, bias=True)
            self.layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return (N, heads, length, head_dim) from (N, length, dim)."""
        n, length, dim = tokens.shape
        return tokens.view(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Return the attended tokens (N, h*w, dim)."""
        keys_values = tokens
        if self.sr_ratio > 1:
            reduced = self.sr(from_tokens(tokens, (height, width)))
            keys_values = self.layer_norm(to_tokens(reduced))
        query, key, value = self._heads(self.query(tokens)), self._heads(self.key(keys_values)), \
            self._heads(self.value(keys_values))
        # softmax(Q K^T / sqrt(head_dim)) V; the fused kernel is the same maths without the L x L' buffer.
        attended = F.scaled_dot_product_attention(query, key, value)
        n, _, length, _ = attended.shape
        return attended.transpose(1, 2).reshape(n, length, -1)


class SelfOutput(nn.Module):
    """Output projection of the attention."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim, bias=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the projected tokens."""
        return self.dense(tokens)


class MiTAttention(nn.Module):
    """Efficient self-attention followed by its output projection (HF layout: ``self``, ``output``)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.self = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.output = SelfOutput(dim)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Return the attention block output (N, h*w, dim)."""
        return self.output(self.self(tokens, height, width))


class DepthwiseConv2d(nn.Module):
    """3x3 depthwise Conv2d on tokens of an h x w frame map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Return the convolved tokens (N, h*w, dim)."""
        return to_tokens(self.dwconv(from_tokens(tokens, (height, width))))


class MixFFN(nn.Module):
    """Mix-FFN: Linear(C->4C), depthwise 3x3 conv (position information), GELU, Linear(4C->C)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden_dim, bias=True)
        self.dwconv = DepthwiseConv2d(hidden_dim)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Return the FFN output tokens."""
        return self.dense2(self.act(self.dwconv(self.dense1(tokens), height, width)))


class MiTLayer(nn.Module):
    """Pre-norm transformer layer of MiT: x += DropPath(Attn(LN1 x)); x += DropPath(MixFFN(LN2 x))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, drop_path: float, mlp_ratio: int = 4):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(dim, eps=1e-5)
        self.attention = MiTAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_norm_2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Return the layer output (N, h*w, dim)."""
        tokens = tokens + self.drop_path(self.attention(self.layer_norm_1(tokens), height, width))
        return tokens + self.drop_path(self.mlp(self.layer_norm_2(tokens), height, width))


class MixTransformer(nn.Module):
    """The MiT encoder's patch embeddings and layers (no per-stage final LayerNorm: Vivim does not use it)."""

    def __init__(self, in_channels: int, embed_dims: Sequence[int], depths: Sequence[int],
                 num_heads: Sequence[int], sr_ratios: Sequence[int], patch_sizes: Sequence[int],
                 patch_strides: Sequence[int], drop_path_rate: float):
        super().__init__()
        total = sum(depths)
        # Stochastic-depth rate grows linearly over all layers of all stages.
        rates = torch.linspace(0, drop_path_rate, total).tolist() if total > 1 else [0.0] * total
        self.patch_embeddings = nn.ModuleList()
        self.block = nn.ModuleList()
        channels, first = in_channels, 0
        for stage, dim in enumerate(embed_dims):
            self.patch_embeddings.append(OverlapPatchEmbedding(channels, dim, patch_sizes[stage],
                                                               patch_strides[stage]))
            self.block.append(nn.ModuleList(
                MiTLayer(dim, num_heads[stage], sr_ratios[stage], rates[first + layer])
                for layer in range(depths[stage])))
            channels, first = dim, first + depths[stage]

    def run_stage(self, stage: int, frames: torch.Tensor) -> torch.Tensor:
        """Return stage ``stage``'s output map (N, C, h, w) from its input map (N, C_prev, H', W')."""
        tokens, height, width = self.patch_embeddings[stage](frames)
        for layer in self.block[stage]:
            tokens = layer(tokens, height, width)
        return from_tokens(tokens, (height, width))


# ---------------------------------------------------------------------------------------------------------------
# Temporal Mamba Block
# ---------------------------------------------------------------------------------------------------------------

class DepthwiseConv3d(nn.Module):
    """3x3x3 depthwise Conv3d over (T, h, w): the 'detail-specific' part of the DSF."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

    def forward(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Return the convolved frame-major tokens (B, T*h*w, dim)."""
        return to_tokens(self.dwconv(from_tokens(tokens, spatial_shape)))


class DetailSpecificFeedForward(nn.Module):
    """DSF: Linear(C->4C), depthwise Conv3d over the clip, GELU, Linear(4C->C)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.dwconv = DepthwiseConv3d(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Return the feed-forward output tokens (B, T*h*w, dim)."""
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), spatial_shape)))


class STMambaV3(nn.Module):
    """ST-Mamba v3: shared in/out projections, three scan branches (forward, reversed, frame-interleaved).

    Branch k has its own causal depthwise conv, x/dt projections, A and D (suffix "", "_b", "_s"); the three
    gated scan outputs are mapped back to frame-major order and averaged before ``out_proj``. Projections keep
    PyTorch's default init here: the TMB layer re-initialises every Linear (ARCHITECTURES.md §4.2).
    """

    BRANCHES = ("", "_b", "_s")

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, backend=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = int(d_model), int(d_state), int(d_conv)
        self.d_inner = int(expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16)
        self.backend = backend
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)
        for suffix in self.BRANCHES:
            # Causal conv: pad d_conv - 1 on both sides and keep the first L outputs.
            setattr(self, f"conv1d{suffix}", nn.Conv1d(self.d_inner, self.d_inner, self.d_conv,
                                                       groups=self.d_inner, padding=self.d_conv - 1, bias=True))
            setattr(self, f"x_proj{suffix}", nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, self.d_inner, bias=True))
            # S4D-real init A[d, n] = -(n + 1), stored as log so that A stays negative.
            a_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)
                                           .repeat(self.d_inner, 1)))
            a_log._no_weight_decay = True
            setattr(self, f"A{suffix}_log", a_log)
            skip = nn.Parameter(torch.ones(self.d_inner))
            skip._no_weight_decay = True
            setattr(self, f"D{suffix}", skip)

    def _scan_branch(self, xz: torch.Tensor, suffix: str) -> torch.Tensor:
        """Return the gated scan output (B, L, d_inner) of one branch on xz (B, L, 2*d_inner) in its order."""
        conv, x_proj, dt_proj = (getattr(self, f"{name}{suffix}") for name in ("conv1d", "x_proj", "dt_proj"))
        x, z = xz.transpose(1, 2).chunk(2, dim=1)
        length = x.shape[-1]
        x = F.silu(conv(x)[..., :length])
        dt, b, c = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2)  # the bias is added (before softplus) in the scan
        a = -torch.exp(getattr(self, f"A{suffix}_log").float())
        y = selective_scan(x, dt, a, b.transpose(1, 2), c.transpose(1, 2), D=getattr(self, f"D{suffix}").float(),
                           z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True, backend=self.backend)
        return y.transpose(1, 2)

    def forward(self, tokens: torch.Tensor, nframes: int) -> torch.Tensor:
        """Return the mixed frame-major tokens (B, T*P, d_model); ``nframes`` = T (frame-interleaved branch)."""
        xz = self.in_proj(tokens)
        forward_out = self._scan_branch(xz, "")
        backward_out = run_reversed(lambda seq: self._scan_branch(seq, "_b"), xz)
        interleaved_out = frame_deinterleave(self._scan_branch(frame_interleave(xz, nframes), "_s"), nframes)
        return self.out_proj(combine([forward_out, backward_out, interleaved_out], "mean"))


def _init_tmb_module(module: nn.Module) -> None:
    """Reference TMB init: trunc-normal(0.02) Linear weights (Mamba projections too), zero biases, LN 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TemporalMambaLayer(nn.Module):
    """TMB layer on a clip map (B, C, T, h, w): y = x + Mixer(LN1 x); y = y + DSF(LN2 y), all in fp32.

    ``mixer`` "alternating": plain Mamba scanning frames T..1 when ``reverse_frames`` else 1..T;
    "st_v3": the three-branch ST-Mamba v3.
    """

    def __init__(self, dim: int, mixer: str = "alternating", reverse_frames: bool = False, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, mlp_ratio: int = 4, backend=None):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"Unknown Vivim mixer {mixer!r}; choose one of {MIXERS}.")
        self.mixer_kind = mixer
        self.reverse_frames = bool(reverse_frames) and mixer == "alternating"
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        if mixer == "alternating":
            self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        else:
            self.mamba = STMambaV3(dim, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = DetailSpecificFeedForward(dim, dim * mlp_ratio)
        self.apply(_init_tmb_module)

    def _mix(self, tokens: torch.Tensor, nframes: int) -> torch.Tensor:
        """Return the mixer output for frame-major tokens of ``nframes`` frames."""
        if self.mixer_kind == "st_v3":
            return self.mamba(tokens, nframes)
        if self.reverse_frames:
            return run_frames_reversed(self.mamba, tokens, nframes)
        return self.mamba(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the updated clip map (B, C, T, h, w) in fp32."""
        # Mamba under fp16 autocast overflows (ARCHITECTURES.md §0.6): the whole layer runs in fp32, autocast off.
        return run_in_fp32(self._update, x.float())

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """Return x + mixer + DSF for an fp32 clip map (B, C, T, h, w)."""
        spatial_shape = x.shape[2:]
        tokens = to_tokens(x)  # frame-major because time is the first spatial axis
        tokens = tokens + self._mix(self.norm1(tokens), spatial_shape[0])
        tokens = tokens + self.mlp(self.norm2(tokens), spatial_shape)
        return from_tokens(tokens, spatial_shape)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer_kind}, reverse_frames={self.reverse_frames}"


# ---------------------------------------------------------------------------------------------------------------
# Encoder, decoder, network
# ---------------------------------------------------------------------------------------------------------------

def _frames_to_clip(frames: torch.Tensor, batch: int, nframes: int) -> torch.Tensor:
    """Return (B, C, T, h, w) from per-frame maps (B*T, C, h, w) ordered b*T + t."""
    _, channels, height, width = frames.shape
    return frames.view(batch, nframes, channels, height, width).transpose(1, 2)


def _clip_to_frames(clip: torch.Tensor) -> torch.Tensor:
    """Return per-frame maps (B*T, C, h, w) ordered b*T + t from (B, C, T, h, w)."""
    batch, channels, nframes, height, width = clip.shape
    return clip.transpose(1, 2).reshape(batch * nframes, channels, height, width)


class VivimEncoder(nn.Module):
    """MiT run per frame, with TMB layers mixing the clip after each MiT stage."""

    def __init__(self, input_channels: int, embed_dims: Sequence[int], mit_depths: Sequence[int],
                 num_heads: Sequence[int], sr_ratios: Sequence[int], patch_sizes: Sequence[int],
                 patch_strides: Sequence[int], tmb_depths: Sequence[int], mixer: str, drop_path_rate: float,
                 d_state: int = 16, backend=None):
        super().__init__()
        self.downsample_layers = MixTransformer(input_channels, embed_dims, mit_depths, num_heads, sr_ratios,
                                                patch_sizes, patch_strides, drop_path_rate)
        # stages[i][l][0]: the reference wraps each TMB layer in its own Sequential; kept for its key layout.
        self.stages = nn.ModuleList(
            nn.Sequential(*(nn.Sequential(TemporalMambaLayer(dim, mixer, reverse_frames=layer % 2 == 1,
                                                             d_state=d_state, backend=backend))
                            for layer in range(tmb_depths[stage])))
            for stage, dim in enumerate(embed_dims))

    def forward(self, frames: torch.Tensor, batch: int, nframes: int) -> List[torch.Tensor]:
        """Return the per-frame maps (B*T, C_i, h_i, w_i) of every stage, highest resolution first."""
        features = []
        for stage in range(len(self.stages)):
            frames = self.downsample_layers.run_stage(stage, frames)
            clip = self.stages[stage](_frames_to_clip(frames, batch, nframes))
            frames = _clip_to_frames(clip)
            features.append(frames)
        return features


class MLPProjection(nn.Module):
    """Per-stage token projection of the SegFormer head."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Return the projected map (N, out_dim, h, w) of a map (N, in_dim, h, w)."""
        return from_tokens(self.proj(to_tokens(frames)), frames.shape[2:])


class SegFormerHead(nn.Module):
    """SegFormer all-MLP head: project every level, upsample to 1/4, concat [4..1], fuse, BN, ReLU, dropout."""

    def __init__(self, embed_dims: Sequence[int], decoder_dim: int = DECODER_DIM, dropout: float = 0.1):
        super().__init__()
        self.deep_supervision = False  # nnU-Net writes this attribute; Vivim has no deep supervision
        self.linear_c = nn.ModuleList(MLPProjection(dim, decoder_dim) for dim in embed_dims)
        self.linear_fuse = nn.Conv2d(decoder_dim * len(embed_dims), decoder_dim, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(decoder_dim)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the fused per-frame features (N, decoder_dim, H/4, W/4)."""
        size = features[0].shape[2:]
        projected = [F.interpolate(projection(level), size=size, mode="bilinear", align_corners=False)
                     for projection, level in zip(self.linear_c, features)]
        fused = self.linear_fuse(torch.cat(projected[::-1], dim=1))
        return self.dropout(self.activation(self.batch_norm(fused)))


def _init_segformer_module(module: nn.Module) -> None:
    """HF SegFormer init: Linear/Conv2d weights N(0, 0.02), biases 0; LayerNorm weight 1, bias 0."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Vivim(nn.Module):
    """Vivim network: (B, Cin, T, H, W) clip -> (B, num_classes, T, H, W) logits for every frame.

    Defaults are MiT-B3 with 2 TMB layers per stage (ARCHITECTURES.md §4.2); the size arguments exist so that tests can
    build tiny networks. H and W must be multiples of the total patch stride (32 for MiT).
    """

    def __init__(self, input_channels: int, num_classes: int, nframes: int, mixer: str = "alternating",
                 embed_dims: Sequence[int] = MIT_B3["embed_dims"], mit_depths: Sequence[int] = MIT_B3["mit_depths"],
                 num_heads: Sequence[int] = MIT_B3["num_heads"], sr_ratios: Sequence[int] = MIT_B3["sr_ratios"],
                 patch_sizes: Sequence[int] = MIT_B3["patch_sizes"],
                 patch_strides: Sequence[int] = MIT_B3["patch_strides"], tmb_depths: Sequence[int] = TMB_DEPTHS,
                 decoder_dim: int = DECODER_DIM, drop_path_rate: float = 0.1, decoder_dropout: float = 0.1,
                 d_state: int = 16, backend=None):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"Unknown Vivim mixer {mixer!r}; choose one of {MIXERS}.")
        if int(nframes) < 1:
            raise ValueError(f"nframes must be at least 1; got {nframes}.")
        per_stage = {"embed_dims": embed_dims, "mit_depths": mit_depths, "num_heads": num_heads,
                     "sr_ratios": sr_ratios, "patch_sizes": patch_sizes, "patch_strides": patch_strides,
                     "tmb_depths": tmb_depths}
        lengths = {name: len(values) for name, values in per_stage.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Vivim's per-stage arguments must have one entry per stage; got lengths {lengths}.")
        self.input_channels, self.num_classes, self.nframes = int(input_channels), int(num_classes), int(nframes)
        self.mixer = mixer
        self.output_stride = math.prod(int(s) for s in patch_strides)
        self.encoder = VivimEncoder(self.input_channels, embed_dims, mit_depths, num_heads, sr_ratios, patch_sizes,
                                    patch_strides, tmb_depths, mixer, drop_path_rate, d_state, backend)
        self.decoder = SegFormerHead(embed_dims, decoder_dim, decoder_dropout)
        self.out = nn.Conv2d(decoder_dim, self.num_classes, kernel_size=1, bias=True)
        # From-scratch init: HF scheme for MiT + head; the TMB layers initialised themselves (reference scheme).
        for module in (self.encoder.downsample_layers, self.decoder, self.out):
            module.apply(_init_segformer_module)

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the wrong dimension of the input clip."""
        if x.dim() != 5:
            raise ValueError(f"Vivim expects clips (batch, channels, frames, height, width); got shape "
                             f"{tuple(x.shape)}.")
        _, channels, nframes, height, width = x.shape
        if channels != self.input_channels:
            raise ValueError(f"Vivim was built for {self.input_channels} input channels; got {channels}.")
        if nframes != self.nframes:
            raise ValueError(f"Vivim was built for clips of {self.nframes} frames (patch_size[0]); got {nframes}. "
                             "Build the network with nframes equal to the clip length.")
        if height % self.output_stride or width % self.output_stride:
            raise ValueError(f"Frame size {height}x{width} is not a multiple of {self.output_stride}; pad or crop "
                             f"frames to a multiple of {self.output_stride}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (B, num_classes, T, H, W) for every frame of the clip x (B, Cin, T, H, W)."""
        self._check_input(x)
        batch, _, nframes, height, width = x.shape
        features = self.encoder(_clip_to_frames(x), batch, nframes)
        logits = self.out(self.decoder(features))
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return _frames_to_clip(logits, batch, nframes)


def build_vivim(patch_size: Sequence[int], input_channels: int, num_classes: int, **arch_kwargs) -> Vivim:
    """Return Vivim for a Vivim configuration: its patch [frames, H, W] and its arch_kwargs (ARCHITECTURES.md §4.1).

    ``arch_kwargs`` are Vivim's constructor arguments as the plans store them (``nframes``, ``mixer``, sizes);
    missing ones take Vivim's defaults. ``nframes`` must equal the patch's frame count.
    """
    patch_size = [int(v) for v in patch_size]
    if len(patch_size) != 3:
        raise PlanError(f"Vivim segments clips stored as 3D images (frames, height, width); this plan is "
                        f"{len(patch_size)}D (patch size {patch_size}). Use the 3d_fullres_vivim configuration of a "
                        "dataset converted with `nnunetv2_mamba video convert`.")
    nframes, height, width = patch_size
    arch_kwargs = dict(arch_kwargs)
    planned_frames = int(arch_kwargs.pop("nframes", nframes))
    if planned_frames != nframes:
        raise PlanError(f"The plan's Vivim nframes={planned_frames} differs from its patch size {patch_size} "
                        f"(frames first); re-run `nnunetv2_mamba video plan` instead of editing one of them.")
    known = set(inspect.signature(Vivim.__init__).parameters) - {"self", "input_channels", "num_classes", "nframes"}
    unknown = sorted(set(arch_kwargs) - known)
    if unknown:
        raise PlanError(f"The plan's Vivim arch_kwargs {unknown} are not arguments of Vivim (known: "
                        f"{sorted(known)}); re-run `nnunetv2_mamba video plan`.")
    stride = math.prod(int(s) for s in arch_kwargs.get("patch_strides", MIT_B3["patch_strides"]))
    if height % stride or width % stride:
        raise PlanError(f"Vivim needs an in-plane patch size that is a multiple of {stride}; the plan's patch "
                        f"size is {patch_size}. Write the Vivim configurations with `nnunetv2_mamba video plan` "
                        f"(it sets the patch to [frames, H, W] with H, W multiples of {stride}).")
    try:
        return Vivim(int(input_channels), int(num_classes), nframes, **arch_kwargs)
    except ValueError as error:
        raise PlanError(f"The plan's Vivim arch_kwargs are invalid: {error}") from None
