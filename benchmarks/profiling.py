"""Kernel times from ``torch.profiler`` and their coarse groups, shared by the profiling benchmarks
(profile_layer.py, profile_network.py, triton_kernels.py)."""
from __future__ import annotations

import collections

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins. cuDNN's convolution kernels are named sm90_xmma_fprop/dgrad/wgrad... (some also carry words
# the scan needles would match), so the conv needles come first, before the GEMM ones that would also match them;
# cuDNN's batch-norm kernels (torch's instance norm) are bn_fw / bn_bw; its NCHW <-> NHWC conversions around the
# convolutions are a group of their own (layout).
GROUPS = (("conv", ("conv", "causal", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
          ("scan", ("_chunk_", "_segment_", "_carry_", "selective_scan", "_scan_")),
          ("layout", ("nchwtonhwc", "nhwctonchw")),
          ("GEMM", ("gemm", "sm90_", "cutlass", "cublas", "ampere_", "matmul")),
          ("norm", ("norm", "welford", "bn_fw", "bn_bw")),
          ("copy", ("copy", "cat", "transpose", "permute")), ("reduction", ("reduce", "sum")))


def group_of(kernel_name: str) -> str:
    """Return the group of a CUDA kernel's name (conv, scan, layout, GEMM, norm, copy, reduction, elementwise/other)."""
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


def group_times(kernels) -> str:
    """Return "group ms, ..." of {kernel: ms}, largest group first."""
    groups = collections.Counter()
    for name, ms in kernels.items():
        groups[group_of(name)] += ms
    return ", ".join(f"{group} {ms:.1f}" for group, ms in groups.most_common())


def kernel_table(kernels, top: int, width: int = 100) -> str:
    """Return a Markdown table of the ``top`` kernels by time, names cut to ``width`` characters."""
    rows = [f"| {name[:width]} | {group_of(name)} | {ms:.2f} |" for name, ms in kernels.most_common(top)]
    return "\n".join(["| kernel | group | ms / step |", "|---|---|---|", *rows])


def profile_steps(step, steps: int, warmup: int) -> collections.Counter:
    """Run ``step()`` ``warmup`` times, reset the peak-memory counter, then profile ``steps`` calls; return
    ``kernel_times`` of them (CUDA ms per step)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return kernel_times(prof, steps)
