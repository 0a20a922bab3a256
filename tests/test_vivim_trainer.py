"""Vivim trainers (ARCHITECTURES.md §4.1): plans adjustment, time-axis checks, in-plane augmentation, recipe, discovery."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2_mamba.plans import NetworkPlan, PlanError
from nnunetv2_mamba.trainers.discovery import concrete_trainers
from nnunetv2_mamba.trainers.vivim import (check_time_axis, nnUNetTrainerVivim, nnUNetTrainerVivimV3,
                                           video_configuration, video_patch_size)


def planned_configuration(patch=(8, 64, 96), median=(40, 70, 300), dim=3):
    """Return a 3d_fullres-like configuration as nnU-Net's planner writes it (ResEnc-style blocks included)."""
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    return {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": list(median), "spacing": [10.0, 1.0, 1.0][-dim:],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities":
            "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": {"n_stages": 3, "features_per_stage": [32, 64, 128], "conv_op": conv,
                                         "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim] + [[2] * dim] * 2,
                                         "n_blocks_per_stage": [1, 2, 2], "n_conv_per_stage_decoder": [1, 1],
                                         "conv_bias": True,
                                         "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                         "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                         "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                         "nonlin_kwargs": {"inplace": True}},
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }


def test_patch_is_five_frames_and_multiples_of_32_capped_at_256():
    assert video_patch_size([64, 64]) == [5, 64, 64]
    assert video_patch_size([70, 250]) == [5, 96, 256]
    assert video_patch_size([20, 1000]) == [5, 32, 256]
    assert video_patch_size([100, 100], nframes=3, max_inplane=64) == [3, 64, 64]
    with pytest.raises(PlanError, match="multiple of 32"):
        video_patch_size([64, 64], max_inplane=100)


def test_video_configuration_copies_and_never_pools_time():
    original = planned_configuration()
    pristine = copy.deepcopy(original)
    adjusted = video_configuration(original)
    assert original == pristine  # the (cached) planner output is not edited in place
    assert adjusted["patch_size"] == [5, 96, 256]
    arch = adjusted["architecture"]["arch_kwargs"]
    assert all(stride[0] == 1 for stride in arch["strides"]) and "n_blocks_per_stage" not in arch
    assert math.prod(s[1] for s in arch["strides"]) == 32
    assert arch["features_per_stage"] == [64, 128, 320, 512]
    # The adjusted configuration is a valid plan for the plugin's plan reader and builds Vivim.
    manager = ConfigurationManager(adjusted)
    plan = NetworkPlan.from_nnunet(None, manager, 3, 2)
    assert plan.patch_size == (5, 96, 256) and plan.dim == 3


def test_trainer_builds_vivim_for_the_adjusted_configuration():
    manager = ConfigurationManager(video_configuration(planned_configuration(median=(6, 64, 64))))
    network = nnUNetTrainerVivim.build_network_architecture(None, manager, 3, 2, enable_deep_supervision=False)
    assert network.mixer == "alternating" and network.nframes == 5 and network.num_classes == 2
    assert network.decoder.deep_supervision is False
    assert nnUNetTrainerVivimV3.vivim_mixer == "st_v3"  # same builder, other mixer (tested in test_vivim_network)


def test_2d_configuration_is_rejected_clearly():
    configuration = planned_configuration(patch=(64, 64), median=(64, 64), dim=2)
    with pytest.raises(PlanError, match="3d_fullres"):
        video_configuration(configuration)
    with pytest.raises(PlanError, match="3d_fullres"):
        nnUNetTrainerVivim.build_network_architecture(None, ConfigurationManager(configuration), 3, 2, False)


def test_time_axis_checks():
    check_time_axis([0, 1, 2], [10.0, 1.0, 1.0], [[10.0, 1.0, 1.0], [10.0, 0.5, 0.5]])  # in-plane may differ
    with pytest.raises(PlanError, match="transpose_forward=\\[1, 0, 2\\]"):
        check_time_axis([1, 0, 2], [10.0, 1.0, 1.0])
    with pytest.raises(PlanError, match="different time spacings"):
        check_time_axis([0, 1, 2], [10.0, 1.0, 1.0], [[10.0, 1.0, 1.0], [5.0, 1.0, 1.0]])
    with pytest.raises(PlanError, match="resamples along time"):
        check_time_axis([0, 1, 2], [20.0, 2.0, 2.0], [[10.0, 1.0, 1.0]])


def test_augmentation_is_in_plane_only():
    trainer = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=[5, 64, 96]),
                              print_to_log_file=lambda *args, **kwargs: None)
    rotation, dummy_2d, initial_patch, mirror_axes = \
        nnUNetTrainerVivim.configure_rotation_dummyDA_mirroring_and_inital_patch_size(trainer)
    assert dummy_2d is True and mirror_axes == (1, 2) and trainer.inference_allowed_mirroring_axes == (1, 2)
    assert initial_patch[0] == 5 and min(initial_patch[1:]) >= 64  # time is never enlarged for rotations

    pipeline = nnUNetTrainerVivim.get_training_transforms(
        [5, 64, 96], rotation, None, mirror_axes, True, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    blurs = [t for t in pipeline.transforms if isinstance(t, RandomTransform)
             and "GaussianBlurTransform" in repr(t.transform)]
    assert len(blurs) == 1 and not isinstance(blurs[0].transform, GaussianBlurTransform)  # wrapped per frame
    assert blurs[0].apply_probability == pytest.approx(0.2)
    # Force the per-frame blur: frames must stay independent (a blur along time would mix them).
    blurs[0].apply_probability = 1.0
    image = torch.zeros(1, 5, 64, 96)
    image[:, 2] = torch.rand(64, 96)  # only frame 2 has content
    blurred = blurs[0](image=image.clone(), segmentation=torch.zeros(1, 5, 64, 96))["image"]
    assert blurred.shape == image.shape
    assert torch.count_nonzero(blurred[:, [0, 1, 3, 4]]) == 0

    sample = pipeline(image=torch.randn(1, 5, 80, 110), segmentation=torch.randint(0, 2, (1, 5, 80, 110)).float())
    assert tuple(sample["image"].shape) == (1, 5, 64, 96)


def test_recipe_adam_with_cosine_to_1e_6():
    trainer = SimpleNamespace(network=torch.nn.Linear(2, 2), initial_lr=1e-4, weight_decay=0.0, num_epochs=1000,
                              min_lr=1e-6)
    optimizer, scheduler = nnUNetTrainerVivim.configure_optimizers(trainer)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["weight_decay"] == 0.0
    lrs = {}
    for epoch in (0, 500, 1000):
        scheduler.step(epoch)
        lrs[epoch] = optimizer.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(1e-4) and lrs[1000] == pytest.approx(1e-6)
    assert lrs[500] == pytest.approx((1e-4 + 1e-6) / 2)


def test_trainers_are_discovered_as_3d_only():
    found = dict(concrete_trainers())
    for name in ("nnUNetTrainerVivim", "nnUNetTrainerVivimV3"):
        assert name in found and found[name].supported_dims == (3,)
    assert not nnUNetTrainerVivim._do_i_compile(None)
