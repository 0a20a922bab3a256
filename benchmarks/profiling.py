"""Kernel times from ``torch.profiler`` and their coarse groups, shared by the profiling benchmarks
(profile_layer.py, profile_network.py, triton_kernels.py)."""
from __future__ import annotations

import collections

from torch.autograd import DeviceType

# First match wins: cuDNN's convolution kernels are named sm90_xmma_fprop/dgrad/wgrad..., so the conv needles come
# before the GEMM ones that would also match them.
GROUPS = (("scan", ("chunk_", "segment_", "carry_", "selective_scan", "_scan_")),
          ("conv", ("conv", "causal", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
          ("GEMM", ("gemm", "sm90_", "cutlass", "cublas", "ampere_", "matmul")),
          ("norm", ("norm", "welford")),
          ("copy", ("copy", "cat", "transpose", "permute")), ("reduction", ("reduce", "sum")))


def group_of(kernel_name: str) -> str:
    """Return the group of a CUDA kernel's name (scan, conv, GEMM, norm, copy, reduction, elementwise/other)."""
    lowered = kernel_name.lower()
    for group, needles in GROUPS:
        if any(needle in lowered for needle in needles):
            return group
    return "elementwise/other"


def kernel_times(prof, steps: int) -> collections.Counter:
    """Return {kernel name: CUDA ms per step} of a finished ``torch.profiler.profile`` over ``steps`` steps."""
    times = collections.Counter()
    for event in prof.key_averages():
        if getattr(event, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue  # CPU-side operator rows would count their kernels twice
        time_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if time_us and event.key and not event.key.startswith("ProfilerStep"):
            times[event.key] += time_us / 1000 / steps
    return times
