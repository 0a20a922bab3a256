"""Vivim trainers (ARCHITECTURES.md §4.1): Vivim configurations in the plans, building from them, unchanged plans,
time-axis checks, in-plane augmentation, recipe, discovery."""
import copy
from types import SimpleNamespace

import pytest
import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_mamba.data.video_plan import (VIVIM_NETWORK_CLASS, add_vivim_configurations, check_time_axis,
                                            video_patch_size)
from nnunetv2_mamba.network_architectures.vivim import Vivim
from nnunetv2_mamba.plans import PlanError
from nnunetv2_mamba.trainers.discovery import concrete_trainers
from nnunetv2_mamba.trainers.vivim import nnUNetTrainerVivim, nnUNetTrainerVivimV3
from tests.builders import nnunet_folders

DATASET_NAME = "Dataset962_VivimTrainerTest"
DATASET_JSON = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "foreground": 1},
                "numTraining": 5, "file_ending": ".nii.gz"}


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


def planned_plans(**configuration_kwargs):
    """Return plans as nnU-Net's planner writes them for a converted video dataset (2d and 3d_fullres)."""
    return {
        "dataset_name": DATASET_NAME, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [10.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 70, 300], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"2d": planned_configuration(patch=(64, 96), median=(70, 300), dim=2),
                           "3d_fullres": planned_configuration(**configuration_kwargs)},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 255.0, "mean": 100.0, "median": 100.0, "min": 0.0, "percentile_00_5": 0.0,
                     "percentile_99_5": 255.0, "std": 50.0} for c in range(3)},
    }


def test_vivim_plan_adds_configurations_inheriting_3d_fullres():
    plans = planned_plans()
    pristine = copy.deepcopy(plans)
    updated = add_vivim_configurations(plans)
    assert plans == pristine  # the planner's dict is not edited in place
    assert {k: v for k, v in updated["configurations"].items() if "vivim" not in k} == pristine["configurations"]
    assert {k: v for k, v in updated.items() if k != "configurations"} == \
        {k: v for k, v in pristine.items() if k != "configurations"}
    raw = updated["configurations"]
    assert raw["3d_fullres_vivim"]["inherits_from"] == "3d_fullres"
    assert raw["3d_fullres_vivim_v3"]["inherits_from"] == "3d_fullres_vivim"
    manager = PlansManager(updated)
    fullres, vivim, v3 = (manager.get_configuration(name) for name in
                          ("3d_fullres", "3d_fullres_vivim", "3d_fullres_vivim_v3"))
    # Same preprocessed data as 3d_fullres: nothing that preprocessing depends on differs.
    for key in ("data_identifier", "spacing", "normalization_schemes", "resampling_fn_data", "batch_size"):
        assert vivim.configuration[key] == v3.configuration[key] == fullres.configuration[key], key
    assert vivim.patch_size == v3.patch_size == [5, 96, 256]
    for configuration, mixer in ((vivim, "alternating"), (v3, "st_v3")):
        assert configuration.network_arch_class_name == VIVIM_NETWORK_CLASS
        arch = configuration.network_arch_init_kwargs
        assert arch["mixer"] == mixer and arch["nframes"] == 5
        assert arch["embed_dims"] == [64, 128, 320, 512] and arch["mit_depths"] == [3, 4, 18, 3]
        assert arch["patch_strides"] == [4, 2, 2, 2] and arch["tmb_depths"] == [2, 2, 2, 2]
        assert "backend" not in arch and "strides" not in arch  # no U-Net entries, no run-time choices


def test_vivim_plan_rejects_plans_it_cannot_serve():
    plans = planned_plans()
    del plans["configurations"]["3d_fullres"]
    with pytest.raises(PlanError, match="no 3d_fullres configuration"):
        add_vivim_configurations(plans)
    plans = planned_plans()
    plans["transpose_forward"] = [1, 0, 2]
    with pytest.raises(PlanError, match="transpose_forward"):
        add_vivim_configurations(plans)
    with pytest.raises(PlanError, match="resamples along time"):
        add_vivim_configurations(planned_plans(), dataset_spacings=[[5.0, 1.0, 1.0]])


@pytest.mark.parametrize("trainer,configuration,mixer", [(nnUNetTrainerVivim, "3d_fullres_vivim", "alternating"),
                                                         (nnUNetTrainerVivimV3, "3d_fullres_vivim_v3", "st_v3")])
def test_trainer_builds_the_network_the_configuration_describes(trainer, configuration, mixer):
    manager = PlansManager(add_vivim_configurations(planned_plans(median=(6, 64, 64))))
    configuration_manager = manager.get_configuration(configuration)
    snapshot = copy.deepcopy(configuration_manager.configuration)
    torch.manual_seed(0)
    network = trainer.build_network_architecture(manager, configuration_manager, 3, 2, enable_deep_supervision=False)
    assert configuration_manager.configuration == snapshot
    assert network.mixer == mixer and network.nframes == 5 and network.num_classes == 2
    assert network.decoder.deep_supervision is False
    torch.manual_seed(0)
    default = Vivim(3, 2, 5, mixer=mixer)  # the plan holds Vivim's real (default MiT-B3) arguments
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in default.parameters())
    for (name, value), (default_name, default_value) in zip(network.state_dict().items(),
                                                            default.state_dict().items()):
        assert name == default_name and torch.equal(value, default_value), name


def test_trainer_refuses_a_configuration_without_vivim_entries():
    manager = PlansManager(add_vivim_configurations(planned_plans()))
    with pytest.raises(PlanError, match=r"describes dynamic_network_architectures.*PlainConvUNet.*"
                                        r"nnunetv2_mamba video plan -d Dataset962_VivimTrainerTest.*"
                                        r"nnUNetv2_train Dataset962_VivimTrainerTest 3d_fullres_vivim FOLD"):
        nnUNetTrainerVivim.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 3, 2, False)
    with pytest.raises(PlanError, match=r"'alternating' mixer.*3d_fullres_vivim_v3"):
        nnUNetTrainerVivimV3.build_network_architecture(manager, manager.get_configuration("3d_fullres_vivim"), 3, 2,
                                                        False)
    with pytest.raises(PlanError, match="PlainConvUNet"):
        nnUNetTrainerVivim.build_network_architecture(manager, manager.get_configuration("2d"), 3, 2, False)


def test_models_trained_before_the_plan_step_still_build_their_network():
    trainer, mixer = nnUNetTrainerVivimV3, "st_v3"  # the trainer's mixer decides (not the default one)
    # The saved plans.json of such a model: 3d_fullres rewritten by the earlier trainer as MiT-B3 "U-Net" stages.
    legacy = planned_configuration(patch=(5, 64, 64))
    legacy["architecture"]["arch_kwargs"].pop("n_blocks_per_stage")
    legacy["architecture"]["arch_kwargs"].update(
        n_stages=4, features_per_stage=[64, 128, 320, 512], kernel_sizes=[[1, 7, 7]] + [[1, 3, 3]] * 3,
        strides=[[1, 4, 4]] + [[1, 2, 2]] * 3, n_conv_per_stage=[3, 4, 18, 3], n_conv_per_stage_decoder=[1, 1, 1])
    plans = planned_plans()
    plans["configurations"]["3d_fullres"] = legacy
    manager = PlansManager(plans)
    network = trainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 3, 2, False)
    checkpoint = Vivim(3, 2, 5, mixer=mixer).state_dict()  # what the earlier trainer built and saved
    assert network.mixer == mixer and list(network.state_dict()) == list(checkpoint)
    network.load_state_dict(checkpoint)
    # A plain nnU-Net 3d_fullres (not rewritten) is still refused.
    with pytest.raises(PlanError, match="PlainConvUNet"):
        trainer.build_network_architecture(PlansManager(planned_plans()),
                                           PlansManager(planned_plans()).get_configuration("3d_fullres"), 3, 2, False)


def make_trainer_folders(tmp_path, monkeypatch):
    """Point nnU-Net's folders into tmp_path; return the dataset's preprocessed folder (3d_fullres data inside)."""
    return nnunet_folders(tmp_path, monkeypatch, DATASET_NAME, "nnUNetPlans_3d_fullres").parent


def test_trainer_leaves_the_plans_it_is_given_unchanged(tmp_path, monkeypatch):
    make_trainer_folders(tmp_path, monkeypatch)
    plans = add_vivim_configurations(planned_plans(median=(6, 64, 64)))
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key (and the trainer pops it)
    before = copy.deepcopy(plans)
    trainer = nnUNetTrainerVivim(plans, "3d_fullres_vivim", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.initialize()
    before.pop("continue_training")
    assert plans == before
    assert trainer.plans_manager.plans == before  # what nnU-Net saves as plans.json for the predictor
    assert trainer.configuration_manager.patch_size == [5, 64, 64]
    assert isinstance(trainer.network, Vivim) and trainer.network.nframes == 5
    assert trainer.enable_deep_supervision is False and trainer.initial_lr == 1e-4


def test_trainer_on_a_configuration_without_vivim_entries_names_the_command(tmp_path, monkeypatch):
    make_trainer_folders(tmp_path, monkeypatch)
    for configuration, expected in (("3d_fullres", "describes dynamic_network_architectures"),
                                    ("3d_fullres_vivim", "have no configuration '3d_fullres_vivim'")):
        plans = planned_plans()
        plans["continue_training"] = False
        with pytest.raises(PlanError, match=expected + ".*nnunetv2_mamba video plan -d Dataset962"):
            nnUNetTrainerVivim(plans, configuration, 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))


def test_trainer_start_checks_the_time_axis_of_the_fingerprint(tmp_path, monkeypatch):
    preprocessed = make_trainer_folders(tmp_path, monkeypatch)
    (preprocessed / "dataset_fingerprint.json").write_text('{"spacings": [[10.0, 1.0, 1.0], [5.0, 1.0, 1.0]]}')
    plans = add_vivim_configurations(planned_plans())
    plans["continue_training"] = False
    with pytest.raises(PlanError, match="different time spacings"):
        nnUNetTrainerVivim(plans, "3d_fullres_vivim", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))


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
