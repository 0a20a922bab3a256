"""U-Mamba trainers (ARCHITECTURES.md §1.1): nnU-Net's default recipe with U-Mamba-Enc / U-Mamba-Bot networks.

Every configuration works (2d, 3d_lowres, 3d_fullres, cascade): the network follows the configuration's plan
and patch size, the cascade only adds input channels. torch.compile stays off (inherited from the base: the
selective scan is a custom autograd Function / CUDA extension that graph-breaks and was reported to give NaN).
"""
from __future__ import annotations

from torch import nn

from nnunetv2_mamba.network_architectures.umamba import build_umamba_bot, build_umamba_enc
from nnunetv2_mamba.plans import NetworkPlan
from nnunetv2_mamba.trainers.base import NoAMPMixin, nnUNetTrainerMambaBase


class nnUNetTrainerUMambaEnc(nnUNetTrainerMambaBase):
    """U-Mamba-Enc (Mamba after every encoder stage; 2D: alternating stages), nnU-Net default recipe."""

    network_family = "U-Mamba-Enc"
    supported_dims = (2, 3)
    is_concrete = True

    @classmethod
    def build_network(cls, plan: NetworkPlan, enable_deep_supervision: bool) -> nn.Module:
        """Return U-Mamba-Enc for the plan."""
        return build_umamba_enc(plan, enable_deep_supervision)


class nnUNetTrainerUMambaBot(nnUNetTrainerMambaBase):
    """U-Mamba-Bot (one Mamba layer on the bottleneck), nnU-Net default recipe."""

    network_family = "U-Mamba-Bot"
    supported_dims = (2, 3)
    is_concrete = True

    @classmethod
    def build_network(cls, plan: NetworkPlan, enable_deep_supervision: bool) -> nn.Module:
        """Return U-Mamba-Bot for the plan."""
        return build_umamba_bot(plan, enable_deep_supervision)


class nnUNetTrainerUMambaEncNoAMP(NoAMPMixin, nnUNetTrainerUMambaEnc):
    """U-Mamba-Enc trained in fp32 (no autocast, no GradScaler), gradient clipping 12."""


class nnUNetTrainerUMambaBotNoAMP(NoAMPMixin, nnUNetTrainerUMambaBot):
    """U-Mamba-Bot trained in fp32 (no autocast, no GradScaler), gradient clipping 12 (plugin addition)."""
