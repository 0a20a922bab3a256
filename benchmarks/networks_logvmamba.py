"""LoG-VMamba entries for benchmarks/benchmark_networks.py: the networks exactly as the trainers build them."""
from functools import partial
from typing import Callable, Dict

from nnunetv2_mamba.network_architectures.logvmamba import build_logvmamba


def networks() -> Dict[str, Callable]:
    """Return {display name: build(plan, deep_supervision) -> nn.Module} for LoG-, L- and G-VMamba."""
    return {"LoGVMamba": partial(build_logvmamba, variant="LoG"),
            "LVMamba": partial(build_logvmamba, variant="L"),
            "GVMamba": partial(build_logvmamba, variant="G")}
