"""The memory estimator: saved-tensor counting, the linear probe fit, monotonicity, the calibration."""

import pytest
import torch
from torch import nn

from nnunetv2_mamba.planning import memory
from nnunetv2_mamba.plans import NetworkPlan
from nnunetv2_mamba.trainers.umamba import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP

SMALL_ARCH = {
    "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def small_plan(patch=(32, 32, 32)):
    return NetworkPlan.from_arch_kwargs(SMALL_ARCH, patch, 1, 2)


@pytest.fixture(scope="module")
def estimator():
    return memory.MemoryEstimator.for_trainer(nnUNetTrainerUMambaBot)


def test_count_saved_bytes_counts_activations_not_parameters():
    linear = nn.Linear(100, 50, bias=False)
    inputs = torch.randn(7, 100)
    # F.linear saves its input (7x100 fp32) and the weight (a parameter: left out); the output 7x50 is added.
    assert memory.count_saved_bytes(linear, inputs) == (7 * 100 + 7 * 50) * 4


def test_probe_patches_double_the_voxels_and_keep_the_topology():
    small, larger = memory.probe_patches(small_plan((48, 64, 80)))
    assert small == (8, 4, 4) and larger == (8, 8, 4)


def test_probe_fit_matches_a_direct_count(estimator):
    """The linear fit from the two probes predicts the saved bytes of a third, larger patch."""
    plan = small_plan((16, 16, 16))
    probe = estimator.probe(plan)
    network = nnUNetTrainerUMambaBot.build_network(plan, True)
    measured = memory.count_saved_bytes(network, torch.randn(1, 1, 16, 16, 16))
    fitted = probe.saved_intercept_bytes + probe.saved_bytes_per_voxel * 16 ** 3
    assert fitted == pytest.approx(measured, rel=0.05)
    assert probe.n_parameters == sum(p.numel() for p in network.parameters())


def test_estimate_is_monotone_in_patch_and_batch(estimator):
    plan = small_plan()
    patches = [(16, 16, 16), (16, 16, 32), (32, 32, 32), (64, 48, 32), (128, 128, 128)]
    for batch in (1, 2, 3, 8):
        values = [estimator.estimate(plan, batch, patch).needed_bytes for patch in patches]
        assert values == sorted(values) and len(set(values)) == len(values)
    for patch in patches:
        values = [estimator.estimate(plan, batch, patch).peak_allocated_bytes for batch in range(1, 10)]
        assert values == sorted(values) and len(set(values)) == len(values)


def test_state_and_overheads_are_accounted(estimator):
    estimate = estimator.estimate(small_plan(), 2)
    probe = estimator.probe(small_plan())
    assert estimate.state_bytes == probe.n_parameters * 14
    assert estimate.needed_bytes == pytest.approx(estimate.peak_allocated_bytes * 1.1 + memory.CUDA_CONTEXT_BYTES)
    assert estimate.as_dict()["batch_size"] == 2


def test_noamp_trainer_counts_fp32_activations(estimator):
    fp32 = memory.MemoryEstimator.for_trainer(nnUNetTrainerUMambaBotNoAMP)
    assert fp32.fp32 and not estimator.fp32
    amp_estimate, fp32_estimate = estimator.estimate(small_plan(), 2), fp32.estimate(small_plan(), 2)
    assert fp32_estimate.activation_bytes == pytest.approx(2 * amp_estimate.activation_bytes)
    assert fp32_estimate.state_bytes == amp_estimate.state_bytes


def test_every_measured_family_is_calibrated_and_borrowed_factors_resolve():
    for family in memory.MEASURED_PEAKS_GIB:
        assert memory.CALIBRATION_FACTORS[family] > 0, family
    assert memory.calibration_factor("L-VMamba") == memory.CALIBRATION_FACTORS["LoG-VMamba"]
    assert memory.calibration_factor("unknown family") == max(memory.CALIBRATION_FACTORS.values())


def test_calibration_reproduces_the_measured_benchmark_peak():
    """The stored factor of U-Mamba-Bot gives back the BENCHMARKS.md peak at the 128^3 plan, batch 2."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from benchmark_networks import BENCHMARK_ARCH_KWARGS

    plan = NetworkPlan.from_arch_kwargs(BENCHMARK_ARCH_KWARGS, (128, 128, 128), 4, 3)
    estimate = memory.MemoryEstimator.for_trainer(nnUNetTrainerUMambaBot).estimate(plan, 2)
    assert estimate.peak_allocated_bytes / memory.GIB == pytest.approx(memory.MEASURED_PEAKS_GIB["U-Mamba-Bot"],
                                                                       rel=0.01)
