"""Taming Mambas entries for benchmarks/benchmark_networks.py: the networks exactly as the trainers build them."""
from functools import partial
from typing import Callable, Dict

from nnunetv2_mamba.network_architectures.taming import build_taming_network


def networks() -> Dict[str, Callable]:
    """Return {display name: build(plan, deep_supervision) -> nn.Module} for the four Taming networks."""
    return {name: partial(build_taming_network, name)
            for name in ("SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip")}
