"""Mamba layer, the shared SSM core and token-order helpers."""
from nnunetv2_mamba.layers.mamba import Mamba
from nnunetv2_mamba.layers.precision import mixer_dtype, run_in_fp32, run_mixer
from nnunetv2_mamba.layers.ssm import init_dt_projection_, selective_scan_branch, ssm_state_parameters, state_matrix
from nnunetv2_mamba.layers.tokens import (BidirectionalMixer, combine, frame_deinterleave, frame_interleave,
                                          from_tokens, reverse_frames, reverse_tokens, run_frames_reversed,
                                          run_in_axis_order, run_on_map, run_reversed, to_tokens)

__all__ = ["Mamba", "mixer_dtype", "run_in_fp32", "run_mixer", "init_dt_projection_", "selective_scan_branch",
           "ssm_state_parameters", "state_matrix", "BidirectionalMixer", "combine", "frame_deinterleave",
           "frame_interleave", "from_tokens", "reverse_frames", "reverse_tokens", "run_frames_reversed",
           "run_in_axis_order", "run_on_map", "run_reversed", "to_tokens"]
