"""NetworkPlan: nnU-Net arch_kwargs -> plain constructor arguments, copies, validation messages."""
import copy

import pytest
import torch

from nnunetv2_mamba.plans import NetworkPlan, PlanError
from tests.builders import arch_kwargs


def arch_kwargs_3d():
    """A 4-stage anisotropic 3D U-Net plan, as nnU-Net 2.8's planner stores it (2 convs per stage)."""
    return arch_kwargs([32, 64, 128, 256], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                       kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], blocks=2, decoder_blocks=2)


def test_reads_plan_resolves_ops_and_sizes():
    arch = arch_kwargs_3d()
    plan = NetworkPlan.from_arch_kwargs(arch, [16, 64, 48], 4, 3, ["conv_op", "norm_op", "dropout_op", "nonlin"])
    assert plan.dim == 3 and plan.conv_op is torch.nn.Conv3d and plan.norm_op is torch.nn.InstanceNorm3d
    assert plan.nonlin is torch.nn.LeakyReLU and plan.input_channels == 4 and plan.num_classes == 3
    assert plan.n_blocks_per_stage == [2, 2, 2, 2] and plan.n_conv_per_stage_decoder == [2, 2, 2]
    assert plan.patch_size == (16, 64, 48) and plan.strides[1] == [1, 2, 2]
    assert all(type(v) is int for v in plan.features_per_stage + plan.kernel_sizes[0] + plan.strides[0])


def test_plan_lists_are_private_copies():
    arch = arch_kwargs_3d()
    snapshot = copy.deepcopy(arch)
    plan = NetworkPlan.from_arch_kwargs(arch, [16, 64, 48], 1, 2)
    plan.n_blocks_per_stage[-1] = 1
    plan.kernel_sizes[0][0] = 7
    plan.norm_op_kwargs["eps"] = 1.0
    assert arch == snapshot
    assert plan.norm_op_kwargs is not arch["norm_op_kwargs"]


def test_resenc_blocks_and_scalar_expansion():
    arch = arch_kwargs_3d()
    del arch["n_conv_per_stage"]
    arch.update(n_blocks_per_stage=[1, 3, 4, 6], kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage_decoder=1)
    plan = NetworkPlan.from_arch_kwargs(arch, [32, 32, 32], 1, 2)
    assert plan.n_blocks_per_stage == [1, 3, 4, 6]
    assert plan.kernel_sizes == [[3, 3, 3]] * 4 and plan.strides[1] == [2, 2, 2]
    assert plan.n_conv_per_stage_decoder == [1, 1, 1]


@pytest.mark.parametrize("change,patch,message", [
    ({"features_per_stage": [32, 64]}, [16, 64, 48], "features_per_stage has 2 entries; expected 4"),
    ({}, [16, 60, 48], r"not divisible by the cumulative stride \[4, 8, 8\] of stage 3"),
    ({}, [16, 64], r"kernel_sizes\[0\]=\[1, 3, 3\] has 3 axes; the patch has 2"),
    ({"conv_op": "torch.nn.NoSuchConv"}, [16, 64, 48], "does not name an importable object"),
    ({"n_stages": None}, [16, 64, 48], "lack"),
    ({"conv_op": "torch.nn.modules.conv.Conv2d"}, [16, 64, 48],
     r"conv_op='Conv2d' does not match the 3D patch size \[16, 64, 48\]; use Conv3d"),
    ({"conv_op": "torch.nn.ConvTranspose3d"}, [16, 64, 48], r"conv_op='ConvTranspose3d' does not match"),
    ({"n_conv_per_stage": [2, 0, 2, 2]}, [16, 64, 48], r"n_conv_per_stage=\[2, 0, 2, 2\] has a stage without"),
    ({"n_conv_per_stage_decoder": [2, 2]}, [16, 64, 48], "n_conv_per_stage_decoder has 2 entries; expected 3"),
    ({"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]}, [16, 64, 48], "strides has 3 entries but n_stages is 4"),
])
def test_bad_plans_raise_clear_errors(change, patch, message):
    arch = arch_kwargs_3d()
    arch.update(change)
    if change.get("n_stages", 1) is None:
        del arch["n_stages"]
    with pytest.raises(PlanError, match=message):
        NetworkPlan.from_arch_kwargs(arch, patch, 1, 2)


def test_unet_kwargs_use_constructor_names():
    plan = NetworkPlan.from_arch_kwargs(arch_kwargs_3d(), [16, 64, 48], 2, 3)
    kwargs = plan.unet_kwargs()
    assert "patch_size" not in kwargs and "input_size" not in kwargs
    assert kwargs["input_channels"] == 2 and kwargs["num_classes"] == 3 and kwargs["n_stages"] == 4
    assert kwargs["n_blocks_per_stage"] == [2, 2, 2, 2] and kwargs["conv_op"] is torch.nn.Conv3d
    assert plan.unet_kwargs(with_input_size=True)["input_size"] == (16, 64, 48)


def test_require_dim_names_the_network_and_the_configuration():
    plan = NetworkPlan.from_arch_kwargs(arch_kwargs_3d(), [16, 64, 48], 2, 3)
    plan.require_dim((2, 3), "AnyNet")
    with pytest.raises(PlanError, match=r"^TwoDNet supports 2D configurations; this configuration is 3D \(patch "
                                        r"size \[16, 64, 48\]\). Choose a 2d configuration. Why.$"):
        plan.require_dim((2,), "TwoDNet", "Why.")
