"""Vivim: video vision Mamba for medical video object segmentation (ARCHITECTURES.md §4; Yang, Xing, Zhu).

A clip (B, Cin, T, H, W) is segmented frame by frame by a MiT-B3 (SegFormer) encoder whose four stages are each
followed by Temporal Mamba Blocks (TMB) that mix the whole clip as one frame-major token sequence of length
T*h*w; a SegFormer all-MLP head fuses the four levels at 1/4 resolution and predicts every frame.

Two mixers are available inside the TMB layers:

* ``"alternating"`` (default, ``nnUNetTrainerVivim``): the seed paper's plain unidirectional Mamba whose scan
  runs over frames 1..T in even layers and T..1 in odd layers (order inside a frame unchanged);
* ``"st_v3"`` (``nnUNetTrainerVivimV3``): the released code's ST-Mamba v3 with shared in/out projections and
  three scan branches (forward, reversed, frame-interleaved) averaged before ``out_proj``.

Every scan goes through the core ``Mamba`` layer / the shared SSM core (``nnunetv2_mamba.layers.ssm``) and the
token-order helpers. The MiT encoder and the SegFormer head are the generic pieces of ``mit.py``.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_mamba.layers import (Mamba, combine, frame_deinterleave, frame_interleave, from_tokens,
                                   run_frames_reversed, run_mixer, run_reversed, selective_scan_branch,
                                   ssm_state_parameters, state_matrix, to_tokens)
from nnunetv2_mamba.layers.norm import token_layer_norm
from nnunetv2_mamba.network_architectures.mit import (DECODER_DIM, MIT_B3, MixTransformer, SegFormerHead,
                                                      init_segformer_module)
from nnunetv2_mamba.plans import PlanError

logger = logging.getLogger(__name__)

TMB_DEPTHS = (2, 2, 2, 2)
MIXERS = ("alternating", "st_v3")


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
            a_log, skip = ssm_state_parameters(self.d_inner, self.d_state)
            setattr(self, f"A{suffix}_log", a_log)
            setattr(self, f"D{suffix}", skip)

    def _scan_branch(self, xz: torch.Tensor, suffix: str) -> torch.Tensor:
        """Return the gated scan output (B, L, d_inner) of one branch on xz (B, L, 2*d_inner) in its order."""
        conv, x_proj, dt_proj = (getattr(self, f"{name}{suffix}") for name in ("conv1d", "x_proj", "dt_proj"))
        x, z = xz.transpose(1, 2).chunk(2, dim=1)
        length = x.shape[-1]
        x = F.silu(conv(x)[..., :length])
        y = selective_scan_branch(x, state_matrix(getattr(self, f"A{suffix}_log")), x_proj.weight, dt_proj.weight,
                                  dt_proj.bias, getattr(self, f"D{suffix}"), z=z, backend=self.backend)
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
        # Mamba under fp16 autocast overflows (ARCHITECTURES.md §0.6): the layer runs in the mixer precision (fp32,
        # or bf16 autocast on a bf16 GPU) around an fp32 residual stream.
        return run_mixer(self._update, x.float())

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """Return x + mixer + DSF for an fp32 clip map (B, C, T, h, w)."""
        spatial_shape = x.shape[2:]
        tokens = to_tokens(x)  # frame-major because time is the first spatial axis
        # Both norms feed projections only (in_proj, fc1): on the GPU they write their tokens in the autocast dtype,
        # what those projections would cast them to; the residual stream stays fp32.
        tokens = tokens + self._mix(token_layer_norm(tokens.transpose(1, 2), self.norm1), spatial_shape[0])
        tokens = tokens + self.mlp(token_layer_norm(tokens.transpose(1, 2), self.norm2), spatial_shape)
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
            module.apply(init_segformer_module)

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
