"""The interface every selective-scan backend implements."""
from __future__ import annotations

from typing import Callable, Optional

import torch


class ScanBackend:
    """A named selective-scan implementation: ``available()``, ``unsupported_reason(...)`` and ``scan``."""

    name: str = ""
    description: str = ""

    def available(self) -> bool:
        """Return True if the backend's dependencies import on this machine."""
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> Optional[str]:
        """Return why the backend cannot be used at all here (None if it can), with the fix."""
        return None

    def unsupported_reason(self, u: torch.Tensor, A: torch.Tensor) -> Optional[str]:
        """Return why this call (device, dtype, state size) cannot run on the backend, or None."""
        return None

    def supports(self, u: torch.Tensor, A: torch.Tensor) -> bool:
        """Return True if the backend can run a scan on these tensors."""
        return self.unsupported_reason(u, A) is None

    def preferred_for(self, u: torch.Tensor, A: torch.Tensor) -> bool:
        """Return True where the automatic choice should take this backend ahead of the preference order
        (shapes where it was measured faster than the backends before it)."""
        return False

    def scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False):
        """Return the scan output (and final state if asked); mamba_ssm ``selective_scan_fn`` semantics."""
        raise NotImplementedError

    def causal_conv1d(self) -> Optional[Callable]:
        """Return a fused causal depthwise conv1d + SiLU function ``f(x, weight, bias, activation="silu")`` (x
        (B, D, L) of any strides, weight (D, W)), or None to use torch's Conv1d."""
        return None

    def fused_mamba_inner(self) -> Optional[Callable]:
        """Return a fused Mamba inner function with mamba_ssm ``mamba_inner_fn`` semantics, or None.

        It runs conv1d + SiLU, x_proj, dt_proj, the scan and out_proj as one autograd function that recomputes
        the conv and delta in its backward pass instead of storing them (less memory, fewer kernels).
        """
        return None
