"""U-Mamba entries for benchmarks/benchmark_networks.py: the networks exactly as the trainers build them."""
from typing import Callable, Dict

from nnunetv2_mamba.network_architectures.umamba import build_umamba_bot, build_umamba_enc


def networks() -> Dict[str, Callable]:
    """Return {display name: build(plan, deep_supervision) -> nn.Module} for U-Mamba-Enc and U-Mamba-Bot."""
    return {"UMambaEnc": build_umamba_enc, "UMambaBot": build_umamba_bot}
