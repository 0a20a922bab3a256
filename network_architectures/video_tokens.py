"""Frame-order token helpers missing from the core ``nnunetv2_mamba.layers.tokens`` (used by Vivim).

Tokens of a clip are frame-major: (B, T*P, C) with T frames of P positions each (C-order flatten of a
(B, C, T, h, w) map). Reversing the *frame* order keeps the order inside each frame, unlike
``reverse_tokens`` which reverses everything. Candidates to move into the core helpers.
"""
from __future__ import annotations

import torch

from nnunetv2_mamba.layers.tokens import TokenMixer


def reverse_frames(tokens: torch.Tensor, nframes: int) -> torch.Tensor:
    """Return frame-major tokens (B, T*P, C) with the frames in reverse order (order inside a frame kept)."""
    batch, length, channels = tokens.shape
    if length % nframes:
        raise ValueError(f"Sequence length {length} is not a multiple of the number of frames {nframes}.")
    return tokens.view(batch, nframes, length // nframes, channels).flip(1).reshape(batch, length, channels)


def run_frames_reversed(mixer: TokenMixer, tokens: torch.Tensor, nframes: int) -> torch.Tensor:
    """Return mixer applied to the tokens with frames T..1, mapped back to frames 1..T."""
    return reverse_frames(mixer(reverse_frames(tokens, nframes)), nframes)
