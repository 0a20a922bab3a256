"""Builders the test modules share (imported by tests/conftest.py): nnU-Net 2.8 plans as plans.json stores them,
initialised nnU-Net trainers on in-memory plans, and batches as nnU-Net's data loader makes them.

Kept in a module of its own rather than in conftest.py so that test modules import them by name (pytest advises
against importing conftest.py).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence, Union

import torch

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def arch_kwargs(features: Sequence[int], strides, kernels=None, blocks: Union[int, Sequence[int]] = 1,
                decoder_blocks: Union[int, Sequence[int]] = 1, blocks_key: str = "n_conv_per_stage") -> dict:
    """Return a U-Net's ``arch_kwargs`` as nnU-Net 2.8 stores them in plans.json.

    The dimension is that of the strides; ``kernels`` defaults to 3 on every axis; ``blocks`` and ``decoder_blocks``
    are per stage or one number for every stage; ``blocks_key`` is ``n_conv_per_stage`` (PlainConvUNet) or
    ``n_blocks_per_stage`` (ResEnc plans).
    """
    dim, n_stages = len(strides[0]), len(features)
    if isinstance(blocks, int):
        blocks = [blocks] * n_stages
    if isinstance(decoder_blocks, int):
        decoder_blocks = [decoder_blocks] * (n_stages - 1)
    return {
        "n_stages": n_stages, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": copy.deepcopy(kernels) if kernels else [[3] * dim] * n_stages,
        "strides": copy.deepcopy(strides), blocks_key: list(blocks), "n_conv_per_stage_decoder": list(decoder_blocks),
        "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def configuration(patch: Sequence[int], arch: dict, name: str = "3d_fullres", **extra) -> dict:
    """Return an nnU-Net 2.8 plans configuration for ``arch`` (held, not copied) at ``patch``; ``extra`` adds keys."""
    dim = len(patch)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    planned = {
        "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [2 * p for p in patch], "spacing": [1.0] * dim,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1}, "batch_dice": False,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch, "_kw_requires_import": list(REQUIRES_IMPORT)},
    }
    planned.update(extra)
    return planned


def configuration_manager(arch: dict, patch: Sequence[int]) -> ConfigurationManager:
    """Return nnU-Net's ConfigurationManager for ``arch`` at ``patch`` (what build_network_architecture reads)."""
    return ConfigurationManager(configuration(patch, arch))


def make_plans(dataset_name: str, configurations: dict, original_median_shape: Sequence[int] = (32, 32, 32)) -> dict:
    """Return a plans dict (as nnU-Net 2.8 writes plans.json) holding ``configurations`` (name -> configuration)."""
    return {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(original_median_shape), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                  "percentile_99_5": 1.0, "std": 1.0}},
    }


def nnunet_folders(tmp_path: Path, monkeypatch, dataset_name: str, data_identifier: str) -> Path:
    """Point nnU-Net's folders (read lazily by nnU-Net 2.8) into ``tmp_path``; return the preprocessed data folder.

    The data folder holds one empty ``.b2nd`` file: ``initialize()`` only looks at the file endings there to pick
    the dataset class.
    """
    for variable in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    data_folder = tmp_path / "nnUNet_preprocessed" / dataset_name / data_identifier
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "case_000.b2nd").touch()
    return data_folder


def make_trainer(trainer_class, plans: dict, configuration_name: str, dataset_json: dict, tmp_path: Path,
                 monkeypatch, device: str = "cpu"):
    """Return an initialised nnU-Net trainer for in-memory ``plans`` (nnU-Net folders under ``tmp_path``)."""
    nnunet_folders(tmp_path, monkeypatch, plans["dataset_name"], f"nnUNetPlans_{configuration_name}")
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key before constructing
    trainer = trainer_class(plans, configuration_name, 0, copy.deepcopy(dataset_json), torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(trainer, batch_size: int = 2, seed: int = 0, num_labels: int = 3) -> dict:
    """Return a training batch as nnU-Net's data loader makes it: labels 0..num_labels-1, and with deep supervision
    on, one target per deep-supervision scale (nearest-neighbour downsampled)."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(batch_size, trainer.num_input_channels, *patch, generator=generator)
    target = torch.randint(0, num_labels, (batch_size, 1, *patch), generator=generator).float()
    if not trainer.enable_deep_supervision:
        return {"data": data, "target": target}
    targets = [torch.nn.functional.interpolate(target, size=[int(round(p * s)) for p, s in zip(patch, scale)],
                                               mode="nearest")
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets}
