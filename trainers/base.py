"""Behaviour shared by every nnunetv2-mamba trainer: plan reading, compile policy, what-trains log, fp32 variants."""
from __future__ import annotations

import collections
import contextlib
import json
import os
from typing import Dict, Tuple

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.io import atomic_write
from nnunetv2_mamba.plans import NetworkPlan
from nnunetv2_mamba.ssm import BACKEND_ENV_VAR, BackendError, select_backend
from nnunetv2_mamba.ssm.scan import requested_backend_name


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

    def network_summary(self) -> Dict[str, object]:
        """Return what trains: network class, parameter counts, scan backend on this device, precision policy."""
        network = unwrap_network(self.network)
        parameters = list(network.parameters())
        mixers_fp32 = bool(getattr(network, "mixer_fp32", True))  # every family but MultiSegMamba (§0.6)
        amp = self.device.type == "cuda" and self.grad_scaler is not None
        return {"network_class": f"{type(network).__module__}.{type(network).__qualname__}",
                "network_parameters": sum(p.numel() for p in parameters),
                "network_trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
                "scan_backend": describe_scan_backends(network, self.device,
                                                       torch.float16 if amp and not mixers_fp32 else torch.float32),
                "precision": precision_policy(self.device.type, isinstance(self, NoAMPMixin), mixers_fp32)}

    def print_plans(self):
        """nnU-Net's plans printout, then the network that is actually built (the plans may name another one)."""
        super().print_plans()
        if self.local_rank == 0:
            summary = self.network_summary()
            self.print_to_log_file(
                "nnunetv2_mamba: the network that trains\n"
                f"  network class:  {summary['network_class']}\n"
                f"  parameters:     {summary['network_parameters']:,} "
                f"({summary['network_trainable_parameters']:,} trainable)\n"
                f"  scan backend:   {summary['scan_backend']}\n"
                f"  precision:      {summary['precision']}\n", add_timestamp=False)

    def _save_debug_information(self):
        """nnU-Net's debug.json plus the network summary (the same values as the training log)."""
        super()._save_debug_information()
        if self.local_rank == 0:
            path = os.path.join(self.output_folder, "debug.json")
            with open(path) as handle:
                debug = json.load(handle)
            debug.update(self.network_summary())
            atomic_write(path, json.dumps(debug, sort_keys=True, indent=4))  # nnU-Net's save_json layout


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the plain network inside DDP / torch.compile wrappers."""
    network = getattr(network, "module", network)  # DistributedDataParallel
    return getattr(network, "_orig_mod", network)  # torch.compile


def describe_scan_backends(network: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Return the scan backend(s) the network's selective scans will use on ``device`` (automatic choice resolved).

    Every 2D ``A..._log`` parameter (D, N) is one selective scan (core Mamba ``A_log``, ST-Mamba v3's ``A_b_log`` /
    ``A_s_log`` branches, LoG-VMamba's ``A_logs``); its module's ``backend`` attribute, else
    $NNUNETV2_MAMBA_BACKEND, else the automatic choice decides, as in the scan itself.
    """
    chosen = collections.Counter()
    problems = []
    for module in network.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not (name.startswith("A") and "_log" in name) or parameter.dim() != 2:
                continue
            channels, state = parameter.shape
            probe = torch.zeros(1, channels, 1, device=device, dtype=dtype)
            try:
                chosen[select_backend(probe, torch.zeros(channels, state, device=device),
                                      getattr(module, "backend", None)).name] += 1
            except BackendError as error:
                problems.append(str(error))
    if not chosen and not problems:
        return "none (this network has no selective scan)"
    forced = requested_backend_name()
    how = f"forced by ${BACKEND_ENV_VAR}={forced}" if forced != "auto" else "automatic choice"
    used = ", ".join(f"{name} ({count} selective scan{'s' * (count != 1)})" for name, count in chosen.most_common())
    text = f"{used} on {device} ({how})" if used else ""
    if problems:
        text += ("; " if text else "") + f"{len(problems)} selective scan(s) cannot run: {problems[0]}"
    return text


def precision_policy(device_type: str, no_amp: bool, mixers_fp32: bool = True) -> str:
    """Return the training precision in words (nnU-Net autocasts and scales gradients only on CUDA)."""
    if no_amp:
        return ("NoAMP fp32: training and validation steps without autocast or GradScaler (inference keeps "
                "nnU-Net's autocast)")
    if device_type != "cuda":
        return f"fp32 (nnU-Net uses no autocast and no GradScaler on {device_type})"
    mixers = ("Mamba mixers in fp32 (autocast off inside)" if mixers_fp32 else
              "Mamba mixers under autocast (scan state accumulated in fp32)")
    return f"fp16 AMP (autocast + GradScaler), {mixers}"


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
