"""The memory estimator: saved-tensor counting, the linear probe fit, monotonicity, the calibration."""

import dataclasses

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


def test_probe_on_the_meta_device_counts_what_the_cpu_forward_saves(monkeypatch):
    """The probe runs the network on the meta device (no RAM for the activations: a deep topology's probe patch once
    got the planner killed); its counts equal a real CPU forward's at both probe patches, to the byte, with the scan
    cut into several chunks (the torch backend's meta shortcut saves the same chunk-start states as its loop)."""
    monkeypatch.setenv("NNUNETV2_MAMBA_TORCH_CHUNK", "1")  # the bottleneck has 2-4 tokens: 2-4 chunks
    plan = small_plan((16, 16, 16))
    devices = []
    real_count = memory.count_saved_bytes

    def recording_count(network, inputs):
        devices.append(inputs.device.type)
        return real_count(network, inputs)

    monkeypatch.setattr(memory, "count_saved_bytes", recording_count)
    probe = memory.probe_activations(nnUNetTrainerUMambaBot.build_network, plan)
    assert devices == ["meta", "meta"]
    for patch in memory.probe_patches(plan):
        network = nnUNetTrainerUMambaBot.build_network(dataclasses.replace(plan, patch_size=patch), True)
        voxels = patch[0] * patch[1] * patch[2]
        on_cpu = real_count(network, torch.randn(1, 1, *patch))
        assert probe.saved_intercept_bytes + probe.saved_bytes_per_voxel * voxels == pytest.approx(on_cpu, abs=1)


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
    assert estimate.needed_bytes == pytest.approx(estimate.peak_allocated_bytes * (1 + memory.PLANNING_MARGIN)
                                                  + memory.CUDA_CONTEXT_BYTES)
    assert estimate.as_dict()["factor"] == memory.calibration_factor(estimator.family)
    assert estimate.as_dict()["batch_size"] == 2


def test_noamp_trainer_counts_fp32_activations(estimator):
    fp32 = memory.MemoryEstimator.for_trainer(nnUNetTrainerUMambaBotNoAMP)
    assert fp32.fp32 and not estimator.fp32
    amp_estimate, fp32_estimate = estimator.estimate(small_plan(), 2), fp32.estimate(small_plan(), 2)
    assert fp32_estimate.activation_bytes == pytest.approx(2 * amp_estimate.activation_bytes)
    assert fp32_estimate.state_bytes == amp_estimate.state_bytes


def test_every_measured_family_is_calibrated_and_borrowed_factors_resolve(monkeypatch):
    monkeypatch.delenv("NNUNETV2_MAMBA_MIXER_DTYPE", raising=False)
    for family in memory.MEASURED_PEAKS_GIB:
        assert memory.CALIBRATION_FACTORS[family] > 0 and memory.FP32_MIXER_FACTORS[family] > 0, family
    assert memory.calibration_factor("L-VMamba") == memory.CALIBRATION_FACTORS["L-VMamba"]
    assert memory.calibration_factor("unknown family") == max(memory.CALIBRATION_FACTORS.values())
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "fp32")  # planning for fp32 mixers: the other table
    assert memory.calibration_factor("L-VMamba") == memory.FP32_MIXER_FACTORS["LoG-VMamba"]
    assert memory.calibration_factor("U-Mamba-Enc") == memory.FP32_MIXER_FACTORS["U-Mamba-Enc"]


def _benchmark_plan(patch, topology, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from benchmark_networks import benchmark_plan

    monkeypatch.setenv("NNUNETV2_MAMBA_BENCH_TOPOLOGY", topology)
    return benchmark_plan(patch)


def test_fp32_mixer_calibration_reproduces_the_measured_benchmark_peak(monkeypatch):
    """With fp32 mixers the stored factor of U-Mamba-Bot gives back the 128^3 / batch-2 peak it was fitted to."""
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "fp32")
    plan = _benchmark_plan((128, 128, 128), "isotropic", monkeypatch)
    estimate = memory.MemoryEstimator.for_trainer(nnUNetTrainerUMambaBot).estimate(plan, 2)
    assert estimate.peak_allocated_bytes / memory.GIB == pytest.approx(memory.MEASURED_PEAKS_GIB["U-Mamba-Bot"],
                                                                       rel=0.01)


# Peaks measured on the H200 (benchmarks/results/2026-12-02-h200*/cal*.log, batch 2, bf16 mixers).
@pytest.mark.parametrize("trainer_name, topology, patch, measured_gib", [
    ("nnUNetTrainerUMambaBot", "isotropic", (64, 64, 64), 1.41),
    ("nnUNetTrainerSegMambaSkip", "anisotropic", (16, 128, 128), 3.81),
    ("nnUNetTrainerBiSegMamba", "isotropic", (64, 64, 64), 3.50),
    ("nnUNetTrainerUMambaBot", "anisotropic", (32, 256, 256), 10.82),
    ("nnUNetTrainerUMambaEnc", "isotropic", (128, 128, 128), 14.82),
    ("nnUNetTrainerUMambaEnc", "anisotropic", (16, 128, 128), 2.46),
    ("nnUNetTrainerMultiSegMamba", "isotropic", (64, 64, 64), 7.85),
    ("nnUNetTrainerMultiSegMamba", "anisotropic", (32, 256, 256), 70.04),
])
def test_default_estimate_is_within_15_percent_of_gpu_peaks(trainer_name, topology, patch, measured_gib, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.delenv("NNUNETV2_MAMBA_MIXER_DTYPE", raising=False)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    plan = _benchmark_plan(patch, topology, monkeypatch)
    estimate = memory.MemoryEstimator.for_trainer(trainer_class).estimate(plan, 2)
    assert estimate.peak_allocated_bytes / memory.GIB == pytest.approx(measured_gib, rel=0.15)


def test_probe_patches_respect_an_in_plane_multiple():
    small, larger = memory.probe_patches(small_plan((48, 64, 80)), in_plane_multiple=32)
    assert small == (8, 32, 32) and larger == (8, 64, 32)


def test_vivim_probes_an_anisotropic_plan(monkeypatch):
    """The anisotropic calibration plan's strides divide in-plane by 16 only; Vivim's patch embedding needs 32."""
    plan = _benchmark_plan((16, 128, 128), "anisotropic", monkeypatch)
    from benchmark_networks import collect_networks  # on the path through _benchmark_plan

    estimator = memory.MemoryEstimator("Vivim", collect_networks()["Vivim"])
    estimate = estimator.estimate(plan, 2)
    assert estimate.activation_bytes > 0
    assert estimator.estimate(plan, 2, (32, 256, 256)).activation_bytes > estimate.activation_bytes


@pytest.mark.parametrize("topology, patch, measured_gib", [("anisotropic", (24, 192, 192), 11.06),
                                                          ("isotropic", (128, 128, 128), 25.14)])
def test_vivim_v3_estimate_is_within_15_percent_of_gpu_peaks(topology, patch, measured_gib, monkeypatch):
    """VivimV3's refitted factor (its fp32-mixer one over-estimated these peaks by 30-32 %)."""
    monkeypatch.delenv("NNUNETV2_MAMBA_MIXER_DTYPE", raising=False)
    plan = _benchmark_plan(patch, topology, monkeypatch)
    from benchmark_networks import collect_networks  # on the path through _benchmark_plan

    estimator = memory.MemoryEstimator("Vivim (ST-Mamba v3)", collect_networks()["VivimV3"])
    assert estimator.estimate(plan, 2).peak_allocated_bytes / memory.GIB == pytest.approx(measured_gib, rel=0.15)
