"""Token-order helpers shared by every network: all scan orders are index permutations of the token axis.

Feature maps are (B, C, *S); tokens are (B, L, C) with L = prod(S) in C order (first spatial axis slowest).
A network says *which* orders it scans and *how* it combines them; it never re-implements the reshapes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from nnunetv2_mamba.layers.memory_format import channels_last_format, is_channels_last
from nnunetv2_mamba.layers.norm import stream_layer_norm

TokenMixer = Callable[[torch.Tensor], torch.Tensor]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Return (B, L, C) tokens of a (B, C, *S) map, first spatial axis slowest."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Return the (B, C, *S) map of (B, L, C) tokens; inverse of ``to_tokens``."""
    batch, length, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, *spatial_shape)


def reverse_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Return the tokens (B, L, C) in reversed order."""
    return tokens.flip(1)


def run_reversed(mixer: TokenMixer, tokens: torch.Tensor) -> torch.Tensor:
    """Return mixer applied to the reversed sequence, mapped back to the original order."""
    return reverse_tokens(mixer(reverse_tokens(tokens)))


def run_on_map(mixer: TokenMixer, x: torch.Tensor) -> torch.Tensor:
    """Return mixer applied to the C-order tokens of a (B, C, *S) map, as a (B, C', *S) map."""
    return from_tokens(mixer(to_tokens(x)), x.shape[2:])


def run_in_axis_order(mixer: TokenMixer, x: torch.Tensor, axis_order: Sequence[int]) -> torch.Tensor:
    """Return mixer applied to a (B, C, *S) map scanned with spatial axes in ``axis_order`` (slowest first).

    ``axis_order`` permutes the spatial axes (0-based, excluding batch and channel); (0, 1, 2) is C order.
    """
    n_spatial = x.dim() - 2
    if sorted(axis_order) != list(range(n_spatial)):
        raise ValueError(f"axis_order must be a permutation of {list(range(n_spatial))}; got {list(axis_order)}.")
    permutation = [0, 1] + [axis + 2 for axis in axis_order]
    inverse = [permutation.index(i) for i in range(len(permutation))]
    permuted = x.permute(*permutation)
    # One copy either way; a channels-last map (the networks' GPU layout) is copied channels last in the new axis
    # order, so that its tokens are that copy's memory (C order: no transposing copies downstream) and the identity
    # order copies nothing.
    memory_format = channels_last_format(x) if is_channels_last(x) else torch.contiguous_format
    return run_on_map(mixer, permuted.contiguous(memory_format=memory_format)).permute(*inverse)


def frame_interleave(tokens: torch.Tensor, nframes: int) -> torch.Tensor:
    """Return frame-major tokens (B, T*P, C) reordered position-major with frames fastest, (B, P*T, C)."""
    batch, length, channels = tokens.shape
    if length % nframes:
        raise ValueError(f"Sequence length {length} is not a multiple of the number of frames {nframes}.")
    return tokens.view(batch, nframes, length // nframes, channels).transpose(1, 2).reshape(batch, length, channels)


def frame_deinterleave(tokens: torch.Tensor, nframes: int) -> torch.Tensor:
    """Return position-major tokens (B, P*T, C) in frame-major order (B, T*P, C); inverse of frame_interleave."""
    batch, length, channels = tokens.shape
    if length % nframes:
        raise ValueError(f"Sequence length {length} is not a multiple of the number of frames {nframes}.")
    return tokens.view(batch, length // nframes, nframes, channels).transpose(1, 2).reshape(batch, length, channels)


def reverse_frames(tokens: torch.Tensor, nframes: int) -> torch.Tensor:
    """Return frame-major tokens (B, T*P, C) with the frames in reverse order (order inside a frame kept)."""
    batch, length, channels = tokens.shape
    if length % nframes:
        raise ValueError(f"Sequence length {length} is not a multiple of the number of frames {nframes}.")
    return tokens.view(batch, nframes, length // nframes, channels).flip(1).reshape(batch, length, channels)


def run_frames_reversed(mixer: TokenMixer, tokens: torch.Tensor, nframes: int) -> torch.Tensor:
    """Return mixer applied to the tokens with frames T..1, mapped back to frames 1..T."""
    return reverse_frames(mixer(reverse_frames(tokens, nframes)), nframes)


def combine(outputs: Sequence[torch.Tensor], mode: str = "sum") -> torch.Tensor:
    """Return the sum or the mean of several direction outputs of equal shape."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"combine mode must be 'sum' or 'mean'; got {mode!r}.")
    total = outputs[0]
    for out in outputs[1:]:
        total = total + out
    return total / len(outputs) if mode == "mean" else total


class BidirectionalMixer(nn.Module):
    """Forward and reversed scans with separate mixers, summed and then normalised: norm(fwd(h) + bwd~(h)).

    The combination used by BiSegMamba-style layers; ``norm`` may be ``nn.Identity()``.
    """

    def __init__(self, forward_mixer: nn.Module, backward_mixer: nn.Module, norm: nn.Module):
        super().__init__()
        self.fwd_mamba = forward_mixer
        self.bwd_mamba = backward_mixer
        self.norm = norm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        total = self.fwd_mamba(tokens) + run_reversed(self.bwd_mamba, tokens)
        if isinstance(self.norm, nn.LayerNorm):  # the Triton token norm on the GPU, in torch's LayerNorm's dtype
            return stream_layer_norm(total.transpose(1, 2), self.norm)
        return self.norm(total)
