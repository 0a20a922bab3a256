"""Vivim entries for benchmarks/benchmark_networks.py: the networks exactly as the trainers build them.

On the issue's 128^3 plan Vivim treats axis 0 as time (T = 128 frames of 128 x 128, ARCHITECTURES.md §5); its own clip-size
benchmark (5 x 256 x 256, frames per second) is benchmarks/benchmark_vivim.py.
"""
from typing import Callable, Dict

from nnunetv2_mamba.trainers.vivim import nnUNetTrainerVivim, nnUNetTrainerVivimV3


def networks() -> Dict[str, Callable]:
    """Return {display name: build(plan, deep_supervision) -> nn.Module} for both Vivim mixers."""
    return {"Vivim": nnUNetTrainerVivim.build_network, "VivimV3": nnUNetTrainerVivimV3.build_network}
