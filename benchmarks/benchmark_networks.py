"""Benchmark the plugin's networks against nnU-Net's PlainConvUNet on one plan; prints a table.

Per network: parameters, training step time (forward + backward + SGD step, fp16 autocast + GradScaler,
deep supervision on as nnU-Net trains), peak GPU memory of the training step, and inference time (batch 1,
fp16 autocast, deep supervision off), each also as a ratio to PlainConvUNet measured in the same run.
Times are medians over the measured steps. ``torch.backends.cudnn.benchmark`` is on, as ``nnUNetv2_train`` sets it
(``$NNUNETV2_MAMBA_BENCH_CUDNN_BENCHMARK=0``: cuDNN's heuristics, as these rows were measured before 2026-12-03's
eighth session); the warm-up steps include cuDNN's timing of its algorithms.

    python benchmarks/benchmark_networks.py                      # the issue's 3D 128^3 plan, every network
    python benchmarks/benchmark_networks.py --networks UMambaBot --steps 10 --json out.json

Networks come from ``benchmarks/networks_*.py``: each defines ``networks() -> {name: build(plan, ds)}``.
"""
from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from reporting import report, run_header, set_cudnn_benchmark

ROOT = Path(__file__).resolve().parent

BENCHMARK_ARCH_KWARGS = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5,
    "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


# A second topology, as nnU-Net plans an anisotropic dataset (thick slices: prostate/cardiac MRI): in-plane
# pooling first, 1x3x3 kernels at full resolution, 2 input channels. $NNUNETV2_MAMBA_BENCH_TOPOLOGY=anisotropic
# selects it (the worker processes inherit it); patches must be multiples of (4, 16, 16).
ANISOTROPIC_ARCH_KWARGS = {
    **BENCHMARK_ARCH_KWARGS, "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
    "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4,
}
TOPOLOGIES = {"isotropic": (BENCHMARK_ARCH_KWARGS, 4, 3), "anisotropic": (ANISOTROPIC_ARCH_KWARGS, 2, 3)}
TOPOLOGY_ENV_VAR = "NNUNETV2_MAMBA_BENCH_TOPOLOGY"


def benchmark_plan(patch_size, input_channels: Optional[int] = None, num_classes: Optional[int] = None):
    """Return the benchmark NetworkPlan (the issue's plan, or the anisotropic one; the patch size can change)."""
    from nnunetv2_mamba.plans import NetworkPlan

    topology = os.environ.get(TOPOLOGY_ENV_VAR, "isotropic")
    if topology not in TOPOLOGIES:
        raise SystemExit(f"${TOPOLOGY_ENV_VAR}={topology!r}: choose one of {sorted(TOPOLOGIES)}.")
    arch_kwargs, channels, classes = TOPOLOGIES[topology]
    return NetworkPlan.from_arch_kwargs(arch_kwargs, patch_size, input_channels or channels, num_classes or classes)


def build_plain_conv_unet(plan, deep_supervision: bool) -> nn.Module:
    """Return nnU-Net's default network for the plan, initialised as nnU-Net does."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    network = PlainConvUNet(plan.input_channels, plan.n_stages, plan.features_per_stage, plan.conv_op,
                            plan.kernel_sizes, plan.strides, plan.n_blocks_per_stage, plan.num_classes,
                            plan.n_conv_per_stage_decoder, plan.conv_bias, plan.norm_op, plan.norm_op_kwargs,
                            plan.dropout_op, plan.dropout_op_kwargs, plan.nonlin, plan.nonlin_kwargs,
                            deep_supervision=deep_supervision)
    network.apply(InitWeights_He(1e-2))
    return network


@functools.lru_cache(maxsize=None)
def collect_networks() -> Dict[str, Callable]:
    """Return {name: builder}: PlainConvUNet first, then every benchmarks/networks_*.py entry."""
    found: Dict[str, Callable] = {"PlainConvUNet": build_plain_conv_unet}
    for path in sorted(ROOT.glob("networks_*.py")):
        spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found.update(module.networks())
    return found


def count_parameters(network: nn.Module) -> int:
    """Return the number of distinct parameters (shared modules counted once)."""
    return sum(p.numel() for p in network.parameters())


def deep_supervision_loss(outputs, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on every output against the nearest-downsampled target, nnU-Net's 1/2^i weights."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    weights = [1 / 2 ** i for i in range(len(outputs))]
    if len(weights) > 1:
        weights[-1] = 0.0  # nnU-Net ignores the lowest resolution
    total = sum(weights)
    loss = 0.0
    for weight, output in zip(weights, outputs):
        if weight == 0:
            continue
        resized = F.interpolate(target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + weight / total * F.cross_entropy(output.float(), resized)
    return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(network, plan, batch: int, steps: int, warmup: int, device) -> Dict[str, float]:
    """Return median training-step milliseconds and the peak memory (GiB) of the steps."""
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    data = torch.randn(batch, plan.input_channels, *plan.patch_size, device=device)
    target = torch.randint(0, plan.num_classes, (batch, *plan.patch_size), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: List[float] = []
    for step in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = deep_supervision_loss(network(data), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
        _sync(device)
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"train_ms": statistics.median(times), "train_peak_gib": peak}


@torch.no_grad()
def time_inference(network, plan, steps: int, warmup: int, device) -> Dict[str, float]:
    """Return median milliseconds of one batch-1 forward pass (deep supervision off)."""
    network.eval()
    if hasattr(network, "decoder") and hasattr(network.decoder, "deep_supervision"):
        network.decoder.deep_supervision = False
    data = torch.randn(1, plan.input_channels, *plan.patch_size, device=device)
    times = []
    for step in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            network(data)
        _sync(device)
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return {"infer_ms": statistics.median(times)}


def measure(name: str, patch_size, batch: int, steps: int, warmup: int, device) -> dict:
    """Return one network's row: parameters, training and inference figures (or the error that stopped it)."""
    plan = benchmark_plan(patch_size)
    row = {"network": name}
    network = None
    try:
        torch.manual_seed(0)
        network = collect_networks()[name](benchmark_plan(patch_size), True).to(device)
        row["params_m"] = count_parameters(network) / 1e6
        row.update(time_training(network, plan, batch, steps, warmup, device))
        row.update(time_inference(network, plan, steps, warmup, device))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of GPU memory"
    except Exception as error:  # keep benchmarking the others; the row says what failed
        row["error"] = f"{type(error).__name__}: {error}"[:200]
    finally:
        del network
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def measure_in_subprocess(name: str, patch_size, batch: int, steps: int, warmup: int, device) -> dict:
    """Return ``measure(...)`` run in a fresh Python process.

    One process per network, so that no network runs in memory left fragmented (or held) by the previous one:
    after a network that peaks near the GPU's capacity, the caching allocator of a shared process frees and
    re-allocates blocks every step, which made later networks several times slower in a shared process.
    """
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--json", str(result),
                   "--patch", *map(str, patch_size), "--batch", str(batch), "--steps", str(steps),
                   "--warmup", str(warmup), "--device", str(device)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0 or not result.exists():
            message = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            return {"network": name, "error": f"worker exited with {completed.returncode}: {message}"[:200]}
        return json.loads(result.read_text())


def run(names: Optional[List[str]], patch_size, batch: int, steps: int, warmup: int, device,
        isolate: bool = True) -> List[dict]:
    """Benchmark the chosen networks (PlainConvUNet always first) and return one row per network."""
    builders = collect_networks()
    unknown = sorted(set(names or []) - set(builders))
    if unknown:
        raise SystemExit(f"Unknown network(s) {unknown}; choose from {list(builders)} (see --list).")
    chosen = ["PlainConvUNet"] + [n for n in builders if n != "PlainConvUNet" and (not names or n in names)]
    rows = []
    for name in chosen:
        row = (measure_in_subprocess if isolate else measure)(name, patch_size, batch, steps, warmup, device)
        rows.append(row)
        print(f"  done {name}: {row}", file=sys.stderr, flush=True)
    baseline = rows[0]
    for row in rows:
        for key in ("params_m", "train_ms", "train_peak_gib", "infer_ms"):
            if key in row and key in baseline and baseline[key]:
                row[f"{key}_ratio"] = row[key] / baseline[key]
    return rows


def format_table(rows: List[dict]) -> str:
    """Return a Markdown table of the rows."""
    header = ("| network | params (M) | train step (ms) | x PlainConvUNet | train peak (GiB) | x PlainConvUNet "
              "| inference (ms) | x PlainConvUNet |")
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['network']} | {row.get('params_m', float('nan')):.2f} | {row['error']} "
                         "| | | | | |")
            continue
        lines.append(f"| {row['network']} | {row['params_m']:.2f} | {row['train_ms']:.1f} | "
                     f"{row['train_ms_ratio']:.2f} | {row['train_peak_gib']:.2f} | {row['train_peak_gib_ratio']:.2f} "
                     f"| {row['infer_ms']:.1f} | {row['infer_ms_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="*", help="names to run (default: all); PlainConvUNet always runs")
    parser.add_argument("--patch", type=int, nargs="+", default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--list", action="store_true", help="list the available networks and exit")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every network in this process (default: one fresh process each)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one network, write its row
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(collect_networks()))
        return 0
    device = torch.device(args.device)
    set_cudnn_benchmark()  # as nnUNetv2_train runs (the workers inherit the environment variable)
    if args.worker:
        row = measure(args.worker, tuple(args.patch), args.batch, args.steps, args.warmup, device)
        Path(args.json).write_text(json.dumps(row))
        return 0
    rows = run(args.networks, tuple(args.patch), args.batch, args.steps, args.warmup, device,
               isolate=not args.same_process)
    info = run_header(device, f"patch {args.patch}, batch {args.batch}, {args.steps} steps after {args.warmup} "
                              f"warm-up, medians, "
                              f"{'one process' if args.same_process else 'one fresh process per network'}")
    report(info, format_table(rows), rows, args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent))
    sys.exit(main())
