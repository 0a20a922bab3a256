"""Behaviour shared by every nnunetv2-mamba trainer: plan reading, compile policy, fp32 variants."""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.plans import NetworkPlan


class nnUNetTrainerMambaBase(nnUNetTrainer):
    """Base of the plugin's trainers. A subclass sets ``network_family`` and implements ``build_network``."""

    #: Human-readable network name, shown by ``nnunetv2_mamba list``.
    network_family: str = ""
    #: Spatial dimensionalities the network supports (2 and/or 3).
    supported_dims: Tuple[int, ...] = (2, 3)
    #: False for abstract bases: they are not listed and cannot train.
    is_concrete: bool = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """Return the network for this configuration (nnU-Net 2.8 signature; the predictor calls it too)."""
        plan = NetworkPlan.from_nnunet(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels)
        plan.require_dim(cls.supported_dims, f"{cls.__name__} ({cls.network_family})")
        return cls.build_network(plan, enable_deep_supervision)

    @classmethod
    def build_network(cls, plan: NetworkPlan, enable_deep_supervision: bool) -> nn.Module:
        """Return the network built from plain plan arguments."""
        raise NotImplementedError(f"{cls.__name__} does not define a network.")

    def _do_i_compile(self) -> bool:
        # The selective scan is a custom autograd Function / CUDA extension: torch.compile graph-breaks on it
        # and has been reported to produce NaN with mamba_ssm, so compile stays off.
        return False


class _Fp32Forward(nn.Module):
    """Calls the wrapped network with autocast disabled and fp32 input (used only during a step)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.network(x.float())


class NoAMPMixin:
    """fp32 training and validation steps (no autocast, no GradScaler); gradient clipping stays at 12.

    nnU-Net's own steps are reused: the network is called through an fp32 wrapper for the step, and without
    a GradScaler nnU-Net takes its plain backward / clip(12) / step path. Inference is unchanged.
    """

    def initialize(self):
        super().initialize()
        self.grad_scaler = None

    @contextlib.contextmanager
    def _fp32_network(self):
        network = self.network
        self.network = _Fp32Forward(network)
        try:
            yield
        finally:
            self.network = network

    def train_step(self, batch: dict) -> dict:
        with self._fp32_network():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._fp32_network():
            return super().validation_step(batch)
