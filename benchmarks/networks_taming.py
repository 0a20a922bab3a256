"""Taming Mambas entries for benchmarks/benchmark_networks.py: the networks exactly as the trainers build them, and
``TamingResEnc``, SegMamba with its mixers replaced by identities: the residual-encoder U-Net the four share, the
floor no mixer optimisation can go below (what the SegMamba family's ratios are made of)."""
from functools import partial
from typing import Callable, Dict

from torch import nn

from nnunetv2_mamba.network_architectures.taming import build_taming_network


def build_taming_resenc(plan, deep_supervision: bool) -> nn.Module:
    """Return SegMamba for ``plan`` with every stage mixer an identity (the convolutional part alone)."""
    network = build_taming_network("SegMamba", plan, deep_supervision)
    network.encoder.mamba_layers = nn.ModuleList(nn.Identity() for _ in network.encoder.mamba_layers)
    return network


def networks() -> Dict[str, Callable]:
    """Return {display name: build(plan, deep_supervision) -> nn.Module} for the four Taming networks and their
    mixer-free U-Net."""
    entries = {name: partial(build_taming_network, name)
               for name in ("SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip")}
    entries["TamingResEnc"] = build_taming_resenc
    return entries
