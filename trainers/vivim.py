"""Vivim trainers for video clips stored as 3D images (frames, height, width): ARCHITECTURES.md §4.1.

Recipe [plugin decision]: trained from scratch (no pretrained weights can be downloaded), Adam(1e-4, betas
0.9/0.999, no weight decay) with an epoch-indexed cosine to 1e-6 over nnU-Net's 1000 x 250 iterations, nnU-Net's
DC+CE loss on every frame, AMP with fp32 Temporal-Mamba layers, gradient clipping 12, no deep supervision.

The plans are adjusted when the trainer starts (and saved with the model, so prediction uses the same): the
patch becomes [nframes=5, H, W] with H, W multiples of 32, and the architecture entries describe MiT-B3
(stride 1 along time) so that nothing in nnU-Net pools along time. Augmentation is in-plane only.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Sequence

import numpy as np
import torch

from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2_mamba.network_architectures.vivim import MIT_B3, build_vivim
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.schedulers import CosineAnnealingEpochLR
from nnunetv2_mamba.trainers.base import nnUNetTrainerMambaBase

#: MiT's total in-plane stride: H and W of the patch must be multiples of it.
INPLANE_MULTIPLE = math.prod(MIT_B3["patch_strides"])


def video_patch_size(median_inplane: Sequence[float], nframes: int = 5, max_inplane: int = 256):
    """Return [nframes, H, W]: the median frame size rounded up to a multiple of 32, at most ``max_inplane``."""
    if max_inplane % INPLANE_MULTIPLE:
        raise PlanError(f"max_inplane={max_inplane} must be a multiple of {INPLANE_MULTIPLE}.")
    inplane = [min(max_inplane, max(INPLANE_MULTIPLE, int(math.ceil(float(size) / INPLANE_MULTIPLE))
                                    * INPLANE_MULTIPLE)) for size in median_inplane]
    return [int(nframes)] + inplane


def video_configuration(configuration: dict, nframes: int = 5, max_inplane: int = 256) -> dict:
    """Return a copy of an nnU-Net 3D configuration adjusted for Vivim (patch, MiT-B3 stages, no time pooling)."""
    adjusted = copy.deepcopy(configuration)
    patch = adjusted.get("patch_size", [])
    if len(patch) != 3:
        raise PlanError(f"Vivim trains on 3D configurations (frames, height, width); this configuration's patch "
                        f"size is {list(patch)}. Use 3d_fullres.")
    median = adjusted.get("median_image_size_in_voxels") or patch
    adjusted["patch_size"] = video_patch_size(median[1:], nframes, max_inplane)
    arch = adjusted["architecture"]["arch_kwargs"]
    n_stages = len(MIT_B3["embed_dims"])
    # Describe the network that is built: MiT stages with stride 1 along time. nnU-Net never pools with these
    # (deep supervision is off) and NetworkPlan's divisibility check then holds for [nframes, 32k, 32k].
    arch.pop("n_blocks_per_stage", None)
    arch.update({
        "n_stages": n_stages,
        "features_per_stage": list(MIT_B3["embed_dims"]),
        "kernel_sizes": [[1, k, k] for k in MIT_B3["patch_sizes"]],
        "strides": [[1, s, s] for s in MIT_B3["patch_strides"]],
        "n_conv_per_stage": list(MIT_B3["mit_depths"]),
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
    })
    return adjusted


def check_time_axis(transpose_forward: Sequence[int], configuration_spacing: Sequence[float],
                    dataset_spacings: Sequence[Sequence[float]] = ()) -> None:
    """Raise PlanError unless time stays axis 0 and no clip is resampled along time."""
    if list(transpose_forward) != [0, 1, 2]:
        raise PlanError(f"nnU-Net transposes this dataset's axes (transpose_forward={list(transpose_forward)}), "
                        "so time would not be the first axis. Give time the largest spacing (datasets written "
                        "by `nnunetv2_mamba video convert` do) and re-run nnUNetv2_plan_and_preprocess.")
    time_spacings = sorted({round(float(spacing[0]), 6) for spacing in dataset_spacings})
    if len(time_spacings) > 1:
        raise PlanError(f"The clips have different time spacings {time_spacings}; nnU-Net would resample them "
                        "along time. Write every clip with the same spacing (video convert does).")
    if time_spacings and abs(float(configuration_spacing[0]) - time_spacings[0]) > 1e-4 * time_spacings[0]:
        raise PlanError(f"This configuration resamples along time (spacing {configuration_spacing[0]} vs the "
                        f"clips' {time_spacings[0]}); train Vivim on 3d_fullres.")


class nnUNetTrainerVivim(nnUNetTrainerMambaBase):
    """Vivim with the seed paper's alternating-direction Mamba layers; from scratch, Adam + cosine."""

    network_family = "Vivim"
    supported_dims = (3,)
    is_concrete = True
    #: Mixer of the Temporal Mamba layers ("alternating" or "st_v3").
    vivim_mixer = "alternating"
    #: Frames per training patch (the paper's clip length).
    nframes = 5
    #: Largest in-plane patch size (the paper's 256 x 256 crops).
    max_inplane_patch = 256
    min_lr = 1e-6

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        adjusted = video_configuration(self.configuration_manager.configuration, self.nframes,
                                       self.max_inplane_patch)
        adjusted.pop("inherits_from", None)  # already resolved into this dict
        # Written into the plans, because nnU-Net saves them with the model and the predictor reads them back.
        self.plans_manager.plans["configurations"][configuration] = adjusted
        self.configuration_manager = ConfigurationManager(adjusted)
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
    def build_network(cls, plan, enable_deep_supervision: bool):
        """Return Vivim for the plan (no deep supervision: a single full-resolution output)."""
        return build_vivim(plan, mixer=cls.vivim_mixer)

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
