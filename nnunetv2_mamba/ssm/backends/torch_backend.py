"""Registration object for the pure-PyTorch scan (always available, any device, fp64 included)."""
from nnunetv2_mamba.ssm.backends.base import ScanBackend
from nnunetv2_mamba.ssm.backends.torch_scan import selective_scan_torch


class TorchBackend(ScanBackend):
    name = "torch"
    description = "pure PyTorch, any device, chunked log-depth scan (slowest, always available)"

    def scan(self, *args, **kwargs):
        return selective_scan_torch(*args, **kwargs)
