"""MiT (Mix Transformer) encoder and SegFormer all-MLP head (Xie et al., SegFormer, NeurIPS 2021).

Generic 2D pieces, applied to every frame independently by Vivim (ARCHITECTURES.md §4.2); the module names
follow the HuggingFace SegFormer layout:

- ``OverlapPatchEmbedding``: strided Conv2d + LayerNorm;
- ``MiTLayer``: ``MiTAttention`` (``EfficientSelfAttention`` with spatial reduction, ``SelfOutput``) and
  ``MixFFN`` (Linear, ``DepthwiseConv2d``, GELU, Linear), pre-norm with DropPath;
- ``MixTransformer``: the patch embeddings and layers of all stages (``run_stage``);
- ``SegFormerHead``: per-level ``MLPProjection``, upsample to the highest resolution, fuse, BN, ReLU, dropout;
- ``init_segformer_module``: the HF SegFormer initialisation.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.regularization import DropPath

from nnunetv2_mamba.layers import from_tokens, to_tokens

__all__ = ["MIT_B3", "DECODER_DIM", "OverlapPatchEmbedding", "EfficientSelfAttention", "SelfOutput", "MiTAttention",
           "DepthwiseConv2d", "MixFFN", "MiTLayer", "MixTransformer", "MLPProjection", "SegFormerHead",
           "init_segformer_module"]

#: MiT-B3 hyper-parameters (SegFormer-B3), per encoder stage.
MIT_B3 = {
    "embed_dims": (64, 128, 320, 512),
    "mit_depths": (3, 4, 18, 3),
    "num_heads": (1, 2, 5, 8),
    "sr_ratios": (8, 4, 2, 1),
    "patch_sizes": (7, 3, 3, 3),
    "patch_strides": (4, 2, 2, 2),
}
#: Width of the SegFormer head (B2-B5).
DECODER_DIM = 768


# ---------------------------------------------------------------------------------------------------------------
# MiT encoder
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
# SegFormer head
# ---------------------------------------------------------------------------------------------------------------

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


def init_segformer_module(module: nn.Module) -> None:
    """HF SegFormer init: Linear/Conv2d weights N(0, 0.02), biases 0; LayerNorm weight 1, bias 0."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

