"""Vivim trainers for video clips stored as 3D images (frames, height, width): ARCHITECTURES.md §4.1.

Recipe [plugin decision]: trained from scratch (no pretrained weights can be downloaded), Adam(1e-4, betas
0.9/0.999, no weight decay) with an epoch-indexed cosine to 1e-6 over nnU-Net's 1000 x 250 iterations, nnU-Net's
DC+CE loss on every frame, AMP with fp32 Temporal-Mamba layers, gradient clipping 12, no deep supervision.

The network comes from the plans, the nnU-Net way: ``nnunetv2_mamba video plan -d DATASET`` adds the
configurations ``3d_fullres_vivim`` / ``3d_fullres_vivim_v3`` (patch [5, H, W], Vivim's architecture entries;
nnunetv2_mamba.data.video_plan) and the trainers build what they describe. The plans are not edited here.
Augmentation is in-plane only.
"""
from __future__ import annotations

import copy
import json
import logging
import os

import numpy as np
import torch

from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.data.video_plan import (VIVIM_CONFIGURATIONS, VIVIM_NETWORK_CLASS, check_time_axis,
                                            plan_command, vivim_arch_kwargs)
from nnunetv2_mamba.network_architectures.vivim import MIT_B3, build_vivim
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.schedulers import CosineAnnealingEpochLR
from nnunetv2_mamba.trainers.base import nnUNetTrainerMambaBase

logger = logging.getLogger(__name__)


def is_legacy_vivim_configuration(configuration_manager) -> bool:
    """Return True for a model's plans written by the earlier Vivim trainers (before ``video plan`` existed).

    Those trainers rewrote 3d_fullres in the saved plans.json as a U-Net with MiT-B3's stages (features 64..512,
    strides [1,4,4], [1,2,2] x 3) and built the default Vivim; recognising them keeps such models predicting.
    """
    try:
        arch = configuration_manager.network_arch_init_kwargs
        return (configuration_manager.network_arch_class_name != VIVIM_NETWORK_CLASS
                and list(arch.get("features_per_stage", [])) == list(MIT_B3["embed_dims"])
                and [list(s) for s in arch.get("strides", [])] == [[1, s, s] for s in MIT_B3["patch_strides"]])
    except (KeyError, TypeError, AttributeError):
        return False


def planned_vivim_kwargs(configuration_manager, trainer: type, configuration: str = "this configuration",
                         dataset: str = "DATASET") -> dict:
    """Return a copy of the configuration's Vivim arch_kwargs; PlanError naming the command if it has none."""
    wanted = VIVIM_CONFIGURATIONS[trainer.vivim_mixer]
    command = (f"Add the Vivim configurations with `{plan_command(dataset)}` (after nnUNetv2_plan_and_preprocess) "
               f"and train them: nnUNetv2_train {dataset} {wanted} FOLD -tr {trainer.__name__}.")
    try:
        network_class = configuration_manager.network_arch_class_name
        arch_kwargs = copy.deepcopy(dict(configuration_manager.network_arch_init_kwargs))
    except (KeyError, TypeError):
        raise PlanError(f"{trainer.__name__}: {configuration} has no architecture entry. {command}") from None
    if network_class != VIVIM_NETWORK_CLASS:
        raise PlanError(f"{trainer.__name__} trains Vivim, but {configuration} describes {network_class}. "
                        f"{command}")
    planned_mixer = arch_kwargs.get("mixer", "alternating")
    if planned_mixer != trainer.vivim_mixer:
        raise PlanError(f"{configuration} describes Vivim with the {planned_mixer!r} mixer, but {trainer.__name__} "
                        f"trains the {trainer.vivim_mixer!r} mixer; use nnUNetv2_train {dataset} {wanted} FOLD "
                        f"-tr {trainer.__name__}.")
    return arch_kwargs


class nnUNetTrainerVivim(nnUNetTrainerMambaBase):
    """Vivim with the seed paper's alternating-direction Mamba layers; from scratch, Adam + cosine."""

    network_family = "Vivim"
    supported_dims = (3,)
    is_concrete = True
    #: Mixer of the Temporal Mamba layers ("alternating" or "st_v3").
    vivim_mixer = "alternating"
    min_lr = 1e-6

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        dataset = plans.get("dataset_name", "DATASET")
        if configuration not in plans.get("configurations", {}):
            raise PlanError(f"The plans of {dataset} have no configuration {configuration!r} (they have "
                            f"{sorted(plans.get('configurations', {}))}). Add the Vivim configurations with "
                            f"`{plan_command(dataset)}` and train "
                            f"{VIVIM_CONFIGURATIONS[self.vivim_mixer]}.")
        super().__init__(plans, configuration, fold, dataset_json, device)
        planned_vivim_kwargs(self.configuration_manager, type(self), f"configuration {configuration!r}", dataset)
        check_time_axis(self.plans_manager.transpose_forward, self.configuration_manager.spacing,
                        self._dataset_spacings())
        self.initial_lr = 1e-4
        self.weight_decay = 0.0
        self.enable_deep_supervision = False

    def _dataset_spacings(self):
        """Return the clips' original spacings from the dataset fingerprint, or [] when it is not available."""
        if self.preprocessed_dataset_folder_base is None:
            return []
        path = os.path.join(self.preprocessed_dataset_folder_base, "dataset_fingerprint.json")
        if not os.path.isfile(path):
            return []
        with open(path) as handle:
            return json.load(handle).get("spacings", [])

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """Return the Vivim the configuration describes (no deep supervision: one full-resolution output)."""
        if is_legacy_vivim_configuration(configuration_manager):
            logger.warning("These plans were written by an earlier nnunetv2-mamba Vivim trainer; building its "
                           "network (default Vivim, %d frames). New trainings use `%s`.",
                           configuration_manager.patch_size[0], plan_command())
            arch_kwargs = vivim_arch_kwargs(configuration_manager.patch_size[0], cls.vivim_mixer)
        else:
            dataset = getattr(plans_manager, "dataset_name", None) or "DATASET"
            arch_kwargs = planned_vivim_kwargs(configuration_manager, cls, dataset=dataset)
        return build_vivim(configuration_manager.patch_size, num_input_channels, num_output_channels, **arch_kwargs)

    @classmethod
    def build_network(cls, plan, enable_deep_supervision: bool):
        """Return Vivim with its default sizes for a U-Net NetworkPlan (benchmarks): nframes = patch_size[0]."""
        return build_vivim(plan.patch_size, plan.input_channels, plan.num_classes,
                           **vivim_arch_kwargs(plan.patch_size[0], cls.vivim_mixer))

    def configure_optimizers(self):
        """Return Adam(1e-4, no weight decay) and a cosine decay to 1e-6 indexed by epoch."""
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, betas=(0.9, 0.999),
                                     weight_decay=self.weight_decay)
        return optimizer, CosineAnnealingEpochLR(optimizer, self.initial_lr, self.num_epochs, min_lr=self.min_lr)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Return in-plane-only augmentation settings: 2D rotation/scaling per frame, mirroring of H and W."""
        patch_size = self.configuration_manager.patch_size
        rotation = (-np.pi, np.pi)
        initial_patch_size = [patch_size[0]] + list(get_patch_size(patch_size[1:], rotation, rotation, rotation,
                                                                   (0.85, 1.25)))
        mirror_axes = (1, 2)
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file("Vivim: in-plane augmentation only (dummy 2D), mirroring axes (1, 2)")
        return rotation, True, initial_patch_size, mirror_axes

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        """Return nnU-Net's training transforms with the Gaussian blur applied per frame (not along time)."""
        pipeline = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        for index, transform in enumerate(pipeline.transforms):
            if isinstance(transform, RandomTransform) and isinstance(transform.transform, GaussianBlurTransform):
                per_frame = ComposeTransforms([Convert3DTo2DTransform(), transform.transform,
                                               Convert2DTo3DTransform()])
                pipeline.transforms[index] = RandomTransform(per_frame, transform.apply_probability)
        return pipeline


class nnUNetTrainerVivimV3(nnUNetTrainerVivim):
    """Vivim with the released code's three-branch ST-Mamba v3 mixer; same recipe as nnUNetTrainerVivim."""

    network_family = "Vivim (ST-Mamba v3)"
    vivim_mixer = "st_v3"
