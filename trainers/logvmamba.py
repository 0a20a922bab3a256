"""LoG-VMamba trainers (ARCHITECTURES.md §3.1): LoG-, L- and G-VMamba on nnU-Net's recipe, plus the paper's recipe.

Default recipe: nnU-Net's (SGD, poly, 1000 epochs, fp16 AMP with the mixers in fp32, clip 12, nnU-Net loss)
with deep supervision off: the network has a single full-resolution output, as the reference. Works for 2d and
3d configurations (2D uses the same topology with 2D ops; the reference's 2D model needs ImageNet weights).

``nnUNetTrainerLoGVMambaPaperRecipe``: the reference recipe, Adam(1e-4, L2 weight decay 1e-4), learning rate
x0.1 at 70 % of the epochs (200 epochs: milestone 140), fp32 training and validation steps, clip 25.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_mamba.network_architectures.logvmamba import build_logvmamba
from nnunetv2_mamba.plans import NetworkPlan
from nnunetv2_mamba.schedulers import StepDecayEpochLR
from nnunetv2_mamba.trainers.base import NoAMPMixin, nnUNetTrainerMambaBase


class nnUNetTrainerLoGVMamba(nnUNetTrainerMambaBase):
    """LoG-VMamba (per-stage L / LoG / G mixers from the plan), nnU-Net's recipe, no deep supervision."""

    network_family = "LoG-VMamba"
    supported_dims = (2, 3)
    is_concrete = True
    #: Mixer variant passed to the network: "LoG", "L" (LTX only) or "G" (GTX only).
    variant = "LoG"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # The network has one full-resolution output (no DS heads), so nnU-Net's loss must not expect a list.
        self.enable_deep_supervision = False

    @classmethod
    def build_network(cls, plan: NetworkPlan, enable_deep_supervision: bool) -> nn.Module:
        """Return LoG-VMamba of this trainer's variant for the plan (always one output tensor)."""
        return build_logvmamba(plan, enable_deep_supervision, variant=cls.variant)


class nnUNetTrainerLVMamba(nnUNetTrainerLoGVMamba):
    """L-VMamba ablation: the local token extractor (LTX) at every stage."""

    network_family = "L-VMamba"
    variant = "L"


class nnUNetTrainerGVMamba(nnUNetTrainerLoGVMamba):
    """G-VMamba ablation: the global token extractor (GTX) at every stage."""

    network_family = "G-VMamba"
    variant = "G"


class nnUNetTrainerLoGVMambaPaperRecipe(NoAMPMixin, nnUNetTrainerLoGVMamba):
    """LoG-VMamba with the reference recipe: Adam 1e-4 (wd 1e-4), x0.1 at 70 % of 200 epochs, fp32, clip 25."""

    #: Epochs of the reference run; the decay milestone is ``lr_decay_fraction`` of ``num_epochs``.
    reference_num_epochs = 200
    lr_decay_fraction = 0.7
    lr_decay_gamma = 0.1
    #: The reference clips at 25 (nnU-Net's own steps clip at 12).
    grad_clip_norm = 25.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-4
        self.num_epochs = self.reference_num_epochs

    def lr_decay_milestone(self) -> int:
        """Return the epoch from which the learning rate is decayed (140 for 200 epochs)."""
        return int(round(self.lr_decay_fraction * self.num_epochs))

    def configure_optimizers(self):
        """Return Adam (coupled L2 weight decay, as torch.optim.Adam and the reference) and the step decay."""
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        scheduler = StepDecayEpochLR(optimizer, self.initial_lr, self.lr_decay_milestone(), self.lr_decay_gamma)
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
        """Run one fp32 training step (autocast off, no GradScaler) with gradient clipping at 25."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, enabled=False):
            output = self.network(data.float())
            loss = self.loss(output, target)
        self.optimizer_step(loss)  # backward, clip at grad_clip_norm, step; skips a non-finite loss
        return {"loss": loss.detach().cpu().numpy()}
