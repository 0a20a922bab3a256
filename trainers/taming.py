"""Taming Mambas trainers: SegMamba, BiSegMamba, MultiSegMamba, SegMambaSkip.

``nnUNetTrainer<Net>`` uses the reference recipe (ARCHITECTURES.md §2.1): RAdam(lr 3e-4, weight decay
3e-5, coupled L2), cosine annealing to 5e-6 (SegMamba, SegMambaSkip: 1000 epochs; BiSegMamba: 300) or
OneCycle (MultiSegMamba: 300 epochs, RAdam beta1 cycled); everything else is nnU-Net's default (fp16 AMP,
clip 12, deep supervision, DC+CE, 250 iterations per epoch).

The reference's cosine used T_max=100 regardless of the run length, so its rate oscillates with a period of
200 epochs; these trainers decay once over the run (``cosine_t_max = None``). ``nnUNetTrainer<Net>PeriodicLR``
reproduces the reference's periodic schedule. ``nnUNetTrainer<Net>NNUNetRecipe`` trains the same network
with nnU-Net's default recipe (SGD, poly, 1000 epochs) to compare the architectures alone.
"""
from __future__ import annotations

from typing import Optional

import torch

from nnunetv2_mamba.network_architectures.taming import build_taming_network
from nnunetv2_mamba.schedulers import CosineAnnealingEpochLR, OneCycleEpochLR
from nnunetv2_mamba.trainers.base import nnUNetTrainerMambaBase


class nnUNetTrainerTamingMambaBase(nnUNetTrainerMambaBase):
    """Builds the Taming network named by ``network_family``; nnU-Net's default recipe."""

    @classmethod
    def build_network(cls, plan, enable_deep_supervision: bool):
        """Return the Taming network for the plan, as upstream builds it."""
        return build_taming_network(cls.network_family, plan, enable_deep_supervision)


class TamingReferenceRecipeMixin:
    """The Taming-Mambas reference recipe: RAdam(3e-4, wd 3e-5) with a cosine or OneCycle epoch schedule."""

    #: Epochs of the reference run.
    reference_num_epochs: int = 1000
    #: "cosine" (to ``cosine_min_lr``) or "one_cycle".
    lr_schedule: str = "cosine"
    cosine_min_lr: float = 5e-6
    #: None: one decay over num_epochs; 100: the reference's periodic schedule (period 200 epochs).
    cosine_t_max: Optional[int] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 3e-4
        self.weight_decay = 3e-5
        self.num_epochs = self.reference_num_epochs

    def configure_optimizers(self):
        """Return RAdam (coupled L2 weight decay, as the reference) and the epoch-indexed schedule."""
        optimizer = torch.optim.RAdam(self.network.parameters(), lr=self.initial_lr,
                                      weight_decay=self.weight_decay)
        if self.lr_schedule == "one_cycle":
            # max_lr 3e-4, start 3e-4/25, end start/1e8, 10 % warm-up, beta1 cycled 0.95 -> 0.85 -> 0.95.
            scheduler = OneCycleEpochLR(optimizer, self.initial_lr, self.num_epochs, pct_start=0.1,
                                        div_factor=25.0, final_div_factor=1e8, cycle_momentum=True)
        elif self.lr_schedule == "cosine":
            scheduler = CosineAnnealingEpochLR(optimizer, self.initial_lr, self.num_epochs,
                                               min_lr=self.cosine_min_lr, t_max=self.cosine_t_max)
        else:
            raise ValueError(f"{type(self).__name__}.lr_schedule must be 'cosine' or 'one_cycle'; "
                             f"got {self.lr_schedule!r}.")
        return optimizer, scheduler


# --- SegMamba -------------------------------------------------------------------------------------------
class nnUNetTrainerSegMambaNNUNetRecipe(nnUNetTrainerTamingMambaBase):
    """SegMamba with nnU-Net's default recipe."""

    network_family = "SegMamba"
    supported_dims = (2, 3)
    is_concrete = True


class nnUNetTrainerSegMamba(TamingReferenceRecipeMixin, nnUNetTrainerSegMambaNNUNetRecipe):
    """SegMamba, reference recipe: RAdam + cosine over 1000 epochs."""

    reference_num_epochs = 1000


class nnUNetTrainerSegMambaPeriodicLR(nnUNetTrainerSegMamba):
    """SegMamba with the reference's literal cosine (T_max=100: the rate oscillates every 200 epochs)."""

    cosine_t_max = 100


# --- BiSegMamba (reference: PanSegMamba) ----------------------------------------------------------------
class nnUNetTrainerBiSegMambaNNUNetRecipe(nnUNetTrainerTamingMambaBase):
    """BiSegMamba with nnU-Net's default recipe."""

    network_family = "BiSegMamba"
    supported_dims = (2, 3)
    is_concrete = True


class nnUNetTrainerBiSegMamba(TamingReferenceRecipeMixin, nnUNetTrainerBiSegMambaNNUNetRecipe):
    """BiSegMamba, reference recipe: RAdam + cosine over 300 epochs."""

    reference_num_epochs = 300


class nnUNetTrainerBiSegMambaPeriodicLR(nnUNetTrainerBiSegMamba):
    """BiSegMamba with the reference's literal cosine (T_max=100 over 300 epochs)."""

    cosine_t_max = 100


# --- MultiSegMamba (3D only) ----------------------------------------------------------------------------
class nnUNetTrainerMultiSegMambaNNUNetRecipe(nnUNetTrainerTamingMambaBase):
    """MultiSegMamba (3D only) with nnU-Net's default recipe."""

    network_family = "MultiSegMamba"
    supported_dims = (3,)
    is_concrete = True


class nnUNetTrainerMultiSegMamba(TamingReferenceRecipeMixin, nnUNetTrainerMultiSegMambaNNUNetRecipe):
    """MultiSegMamba (3D only), reference recipe: RAdam + OneCycle over 300 epochs."""

    reference_num_epochs = 300
    lr_schedule = "one_cycle"


# --- SegMambaSkip ---------------------------------------------------------------------------------------
class nnUNetTrainerSegMambaSkipNNUNetRecipe(nnUNetTrainerTamingMambaBase):
    """SegMambaSkip with nnU-Net's default recipe."""

    network_family = "SegMambaSkip"
    supported_dims = (2, 3)
    is_concrete = True


class nnUNetTrainerSegMambaSkip(TamingReferenceRecipeMixin, nnUNetTrainerSegMambaSkipNNUNetRecipe):
    """SegMambaSkip, reference recipe: RAdam + cosine over 1000 epochs."""

    reference_num_epochs = 1000


class nnUNetTrainerSegMambaSkipPeriodicLR(nnUNetTrainerSegMambaSkip):
    """SegMambaSkip with the reference's literal cosine (T_max=100 over 1000 epochs)."""

    cosine_t_max = 100
