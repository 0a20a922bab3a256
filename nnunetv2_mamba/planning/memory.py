"""Estimate the peak GPU memory of one fp16-AMP training step of a plugin network, without a GPU.

The estimate has three parts (bytes):

* **state**: parameters (fp32), their gradients (fp32), SGD momentum (fp32, nnU-Net's optimizer) and the
  fp16 copies of the weights autocast caches during the forward: ``14 * n_parameters``.
* **activations**: what autograd keeps for the backward. Counted with
  ``torch.autograd.graph.saved_tensors_hooks`` during an fp32 forward (on the meta device: no memory, no
  arithmetic, the CPU's counts) of the network built for two small probe patches with the plan's topology
  (same stages, strides, kernels, features), batch 1, then fitted as
  ``intercept + per_voxel * voxels`` (every saved tensor is a feature map, or a scan state, whose size is
  linear in the voxels of the patch) and multiplied by the batch. The network outputs (kept for the loss)
  are counted too.
* **calibration**: a per-family factor turns the fp32 saved bytes into the peak allocated at fp16 AMP on the
  GPU (half-precision activations, bf16 mixers, the scan kernel's own saved states -- mamba_ssm's fused path
  keeps ``xz``, ``x_dbl`` and the conv state instead of what the torch backend saves -- and the transient
  gradient buffers of the backward). It was fitted to peaks measured on the GPU (BENCHMARKS.md, "Memory
  estimate"): per family the factor with the smallest worst relative error over three patch sizes of two
  topologies and, where measured, real ``nnUNetv2_train`` steps of 24 / 40 GB plans
  (``benchmarks/fit_memory_factors.py``).

To fit a GPU the planner adds a constant for the CUDA context and a planning margin (allocator fragmentation
and the estimate's error) on top of the peak allocated (``needed_bytes``). Every term is non-negative and grows
with the voxels and the batch, so the estimate is monotone in patch and batch by construction.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunetv2_mamba.network_architectures.mit import MIT_B3

logger = logging.getLogger(__name__)

GIB = 2 ** 30
#: fp32 weights + fp32 gradients + fp32 SGD momentum + fp16 weight copies cached by autocast.
STATE_BYTES_PER_PARAMETER = 4 + 4 + 4 + 2
#: Memory the CUDA context and cuDNN/cuBLAS handles take outside the caching allocator (not calibrated).
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
#: Headroom on the estimated peak allocated memory, as a fraction of it: the caching allocator's reserved-but-
#: unallocated blocks plus the estimate's own error. 15 % because the largest under-estimate measured for a real
#: ``nnUNetv2_train`` step is 12 % (U-Mamba-Bot at 224x192x192, BENCHMARKS.md "Memory estimate"); the 10 % it was
#: before the 24 / 40 GB runs left that plan 0.03 GiB below its cap.
PLANNING_MARGIN = 0.15

#: Families whose networks need the in-plane axes of a patch divisible by more than the plan's strides, so that the
#: probe can build them: Vivim's MiT-B3 patch embeddings divide H and W by their strides' product (32; the check in
#: network_architectures/vivim.py).
PROBE_IN_PLANE_MULTIPLE = {family: math.prod(MIT_B3["patch_strides"]) for family in ("Vivim", "Vivim (ST-Mamba v3)")}
#: Factors with the mixers in fp32 (``$NNUNETV2_MAMBA_MIXER_DTYPE=fp32``, GPUs without bf16): fitted to one
#: point per family, the 128^3 / batch-2 peaks of 2026-11-23 (``calibrate_memory.py --derive``). U-Mamba-Enc/Bot and
#: LoG-VMamba re-derived on 2026-12-03 from the same peaks with the probe of the decoders that run their 1x1 conv
#: before the interpolation (fewer saved bytes): the peaks of that code are lower (bf16 mixers, 128^3: U-Mamba-Bot
#: 9.25 -> 8.09 GiB, BENCHMARKS.md 2026-12-03), so these three over-estimate until the fp32 peaks are re-measured.
FP32_MIXER_FACTORS: Dict[str, float] = {
    "PlainConvUNet": 0.6416, "U-Mamba-Enc": 0.829, "U-Mamba-Bot": 0.6417, "LoG-VMamba": 0.7432,
    "SegMamba": 0.7703, "BiSegMamba": 0.758, "MultiSegMamba": 0.4934, "SegMambaSkip": 0.7625,
    "Vivim": 0.8168, "Vivim (ST-Mamba v3)": 1.0377,
}
#: Per-family factor: peak allocated activation memory at fp16 AMP on the GPU / fp32 saved bytes on the CPU,
#: with the Mamba mixers under the default bf16 policy (layers/precision.py). Fitted by
#: ``benchmarks/fit_memory_factors.py`` (the minimax factor over a family's points) to the peaks measured on an
#: H200 (mamba_ssm backend, 2026-12-02): ``benchmarks/calibrate_memory.py`` steps at three patch sizes of two
#: topologies, and for the families ``nnunetv2_mamba plan`` serves the real ``nnUNetv2_train`` steps of the 24 / 40
#: GB plans (tests/nnunetv2_mamba/planning/test_plan_gpu.py); BENCHMARKS.md, "Memory estimate", lists every point.
#: Every family has 6-10 points (three patches of each topology; L-/G-VMamba and PlainConvUNet no nnU-Net runs).
#: Refit of 2026-12-02 (fourth session): VivimV3 from its fp32-mixer factor (30 % over its six points) to 0.7658.
#: MultiSegMamba keeps 0.4934 (its mixers follow fp16 autocast, so the bf16 policy does not apply), worst error 2.9 %
#: over its eight points: the refit's 0.4864 (1.7 %) would change the 24 GB plan (96x80x80 -> 96x96x80) away from the
#: one trained within its cap on the GPU. SegMamba and Vivim keep their factors too (refit moved them by < 0.1 %).
CALIBRATION_FACTORS: Dict[str, float] = {
    "PlainConvUNet": 0.5931, "U-Mamba-Enc": 0.5393, "U-Mamba-Bot": 0.5546, "LoG-VMamba": 0.6270,
    "L-VMamba": 0.6027, "G-VMamba": 0.6013, "SegMamba": 0.5732, "BiSegMamba": 0.5388, "SegMambaSkip": 0.5396,
    "Vivim": 0.7032, "Vivim (ST-Mamba v3)": 0.7658, "MultiSegMamba": FP32_MIXER_FACTORS["MultiSegMamba"],
}
#: Families whose factor is borrowed, and from which measured family.
BORROWED_FACTORS: Dict[str, str] = {"L-VMamba": "LoG-VMamba", "G-VMamba": "LoG-VMamba"}
#: Used for a family with no calibration at all (logged): the largest measured factor, to err on the safe side.
DEFAULT_FACTOR_FAMILY = "max"

#: The peaks (GiB) FP32_MIXER_FACTORS were fitted to: benchmark_networks.py, 128^3 plan, batch 2, fp16 AMP.
MEASURED_PEAKS_GIB: Dict[str, float] = {
    "PlainConvUNet": 4.75, "U-Mamba-Enc": 20.06, "U-Mamba-Bot": 9.25, "LoG-VMamba": 7.14, "SegMamba": 21.54,
    "BiSegMamba": 31.05, "MultiSegMamba": 57.00, "SegMambaSkip": 30.72, "Vivim": 22.08,
    "Vivim (ST-Mamba v3)": 33.15,
}


@dataclasses.dataclass(frozen=True)
class ActivationProbe:
    """What one topology costs: parameters and the linear fit of fp32 saved bytes per sample."""

    n_parameters: int
    saved_intercept_bytes: float
    saved_bytes_per_voxel: float


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The estimate of one training step (bytes), split into its parts."""

    family: str
    patch_size: Tuple[int, ...]
    batch_size: int
    state_bytes: float
    activation_bytes: float
    fp32: bool
    factor: Optional[float] = None  # the calibration factor applied (recorded so that plans can be refitted)

    @property
    def peak_allocated_bytes(self) -> float:
        """Return what ``torch.cuda.max_memory_allocated`` should report for the step."""
        return self.state_bytes + self.activation_bytes

    @property
    def needed_bytes(self) -> float:
        """Return the GPU memory the step needs: peak allocated + planning margin + CUDA context."""
        return self.peak_allocated_bytes * (1 + PLANNING_MARGIN) + CUDA_CONTEXT_BYTES

    def as_dict(self) -> dict:
        """Return a JSON-ready summary in GiB."""
        return {"family": self.family, "patch_size": list(self.patch_size), "batch_size": self.batch_size,
                "fp32": self.fp32, "state_gib": round(self.state_bytes / GIB, 3),
                "activation_gib": round(self.activation_bytes / GIB, 3),
                "peak_allocated_gib": round(self.peak_allocated_bytes / GIB, 3),
                "needed_gib": round(self.needed_bytes / GIB, 3),
                "cuda_context_gib": round(CUDA_CONTEXT_BYTES / GIB, 3),
                "planning_margin": PLANNING_MARGIN, "factor": self.factor}


def _storage_key(tensor: torch.Tensor) -> int:
    """Return an identity of the tensor's storage, shared by its views, on every device (meta storages have no
    data pointer; ``_cdata`` is the address of the storage object, unique while it lives, and every storage counted
    here is kept alive by autograd until the count is done)."""
    return tensor.untyped_storage()._cdata


def count_saved_bytes(network: nn.Module, inputs: torch.Tensor) -> int:
    """Return the bytes autograd saves for the backward of ``network(inputs)`` plus the outputs' bytes.

    Storages are counted once (views share them); parameters are left out (they are part of the state).
    """
    parameter_storages = {_storage_key(p) for p in network.parameters()}
    saved: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if _storage_key(tensor) not in parameter_storages:
            saved[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = network(inputs)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    for output in outputs:
        saved.setdefault(_storage_key(output), output.untyped_storage().nbytes())
    return sum(saved.values())


def probe_patches(plan, in_plane_multiple: int = 1) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Return two small patches of the plan's topology, the second with twice the voxels of the first.

    The first is the smallest divisible patch doubled on axis 0 (instance norm needs more than one voxel at the
    bottleneck), the second also doubles axis 1. ``in_plane_multiple``: what the network needs the axes after the
    first to be divisible by besides the plan's strides (Vivim's patch embedding: 32).
    """
    assert in_plane_multiple >= 1, in_plane_multiple
    divisor = [int(v) for v in np.prod(np.array(plan.strides, dtype=np.int64), axis=0)]
    divisor = divisor[:1] + [math.lcm(v, in_plane_multiple) for v in divisor[1:]]
    small = (2 * divisor[0],) + tuple(divisor[1:])
    larger = (small[0], 2 * small[1]) + small[2:]
    return small, larger


def probe_activations(build: Callable, plan, in_plane_multiple: int = 1) -> ActivationProbe:
    """Build the network at the two probe patches and fit its fp32 saved bytes per sample.

    The network is built on the CPU and its forward runs on the meta device (shapes, dtypes and storages without
    memory or arithmetic; the torch scan backend, as on the CPU), so a probe costs no RAM whatever its size: the
    probe patches of a deep topology (7 stages: 128 x 64 x 64 voxels) once took MultiSegMamba's planner past 24 GB of
    RAM and got it killed. The counts are the CPU forward's to the byte (tests/nnunetv2_mamba/planning/test_memory.py).
    """
    points = []
    n_parameters = 0
    for patch in probe_patches(plan, in_plane_multiple):
        probe_plan = dataclasses.replace(plan, patch_size=patch)
        torch.manual_seed(0)
        network = build(probe_plan, True).to("meta")
        network.train()
        n_parameters = max(n_parameters, sum(p.numel() for p in network.parameters()))
        inputs = torch.empty(1, plan.input_channels, *patch, device="meta")
        points.append((float(np.prod(patch)), float(count_saved_bytes(network, inputs))))
        del network
    (v1, s1), (v2, s2) = points
    per_voxel = max((s2 - s1) / (v2 - v1), 0.0)
    intercept = max(s1 - per_voxel * v1, 0.0)
    return ActivationProbe(n_parameters, intercept, per_voxel)


def _factors() -> Dict[str, float]:
    """Return the factor table of the mixer policy the GPU will run (planning usually runs on a CPU).

    The default assumes a GPU with bf16 (Ampere or newer); ``$NNUNETV2_MAMBA_MIXER_DTYPE=fp32`` plans for fp32
    mixers (the references' policy, and what a GPU without bf16 runs).
    """
    from nnunetv2_mamba.layers.precision import requested_mixer_dtype

    return FP32_MIXER_FACTORS if requested_mixer_dtype() == "fp32" else CALIBRATION_FACTORS


def calibration_factor(family: str) -> float:
    """Return the fitted factor of a family (a measured sibling's, or the largest one, when it has none)."""
    factors = _factors()
    if family in factors:
        return factors[family]
    if BORROWED_FACTORS.get(family) in factors:
        return factors[BORROWED_FACTORS[family]]
    logger.warning("No memory calibration for network family %r; using the largest calibrated factor.", family)
    return max(factors.values())


def estimate_from_probe(family: str, probe: ActivationProbe, patch_size: Sequence[int], batch_size: int,
                        fp32: bool = False, factor: Optional[float] = None) -> MemoryEstimate:
    """Return the estimate of a training step at ``patch_size`` x ``batch_size`` from a topology's probe.

    ``fp32`` (the NoAMP trainers) doubles the activation factor: no half-precision activations.
    """
    assert batch_size >= 1, f"batch size must be >= 1, got {batch_size}"
    factor = calibration_factor(family) if factor is None else factor
    if fp32:
        factor *= 2
    voxels = float(np.prod([int(v) for v in patch_size]))
    per_sample = probe.saved_intercept_bytes + probe.saved_bytes_per_voxel * voxels
    state = float(probe.n_parameters * STATE_BYTES_PER_PARAMETER)
    return MemoryEstimate(family, tuple(int(v) for v in patch_size), int(batch_size), state,
                          factor * batch_size * per_sample, fp32, factor)


def topology_key(plan) -> tuple:
    """Return what the probe depends on (everything in the plan but the patch size)."""
    return (plan.input_channels, plan.num_classes, tuple(plan.features_per_stage),
            tuple(map(tuple, plan.kernel_sizes)), tuple(map(tuple, plan.strides)), tuple(plan.n_blocks_per_stage),
            tuple(plan.n_conv_per_stage_decoder), getattr(plan.conv_op, "__name__", str(plan.conv_op)))


class MemoryEstimator:
    """Estimates training steps of one network family; probes are cached per topology."""

    def __init__(self, family: str, build: Callable, fp32: bool = False):
        self.family = family
        self.build = build
        self.fp32 = fp32
        self._probes: Dict[tuple, ActivationProbe] = {}

    @classmethod
    def for_trainer(cls, trainer_class) -> "MemoryEstimator":
        """Return the estimator of a plugin trainer (its ``build_network``; NoAMP trainers count fp32)."""
        from nnunetv2_mamba.trainers.base import NoAMPMixin

        return cls(trainer_class.network_family, trainer_class.build_network,
                   fp32=issubclass(trainer_class, NoAMPMixin))

    def probe(self, plan) -> ActivationProbe:
        """Return (and cache) the probe of the plan's topology."""
        key = topology_key(plan)
        if key not in self._probes:
            threads = torch.get_num_threads()
            try:
                with torch.random.fork_rng(devices=[]):
                    self._probes[key] = probe_activations(
                        self.build, plan, PROBE_IN_PLANE_MULTIPLE.get(self.family, 1))
            finally:
                torch.set_num_threads(threads)
            logger.info("memory probe %s %s: %s", self.family, key[4], self._probes[key])
        return self._probes[key]

    def estimate(self, plan, batch_size: int, patch_size: Optional[Sequence[int]] = None) -> MemoryEstimate:
        """Return the estimate of a training step for the plan's topology at its (or the given) patch size."""
        patch_size = plan.patch_size if patch_size is None else patch_size
        return estimate_from_probe(self.family, self.probe(plan), patch_size, batch_size, self.fp32)
