"""Check (GPU) or fit (CPU) nnunetv2_mamba.planning.memory's estimate against real training steps.

On a GPU, for every network family at three patch sizes: measures the peak memory of a real fp16-AMP training
step (benchmark_networks.time_training: forward + backward + SGD with GradScaler, deep supervision on, one
fresh process per measurement) and prints the estimate next to it with the error; writes JSON.

    python benchmarks/calibrate_memory.py --json benchmarks/results/memory_calibration.json
    python benchmarks/calibrate_memory.py --networks UMambaEnc SegMamba --patches 64 96 128 --batch 2

On the CPU, ``--derive`` prints the calibration factors (peak at 128^3 / batch 2 from BENCHMARKS.md, minus
the state, over the fp32 saved bytes) that nnunetv2_mamba/planning/memory.py stores:

    python benchmarks/calibrate_memory.py --derive
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_networks import benchmark_plan, collect_networks, measure_in_subprocess  # noqa: E402
from reporting import run_header  # noqa: E402

from nnunetv2_mamba.planning import memory  # noqa: E402

#: benchmark_networks name -> trainer network_family (the key of the calibration factors).
FAMILY_OF_BENCHMARK = {
    "PlainConvUNet": "PlainConvUNet", "UMambaEnc": "U-Mamba-Enc", "UMambaBot": "U-Mamba-Bot",
    "LoGVMamba": "LoG-VMamba", "LVMamba": "L-VMamba", "GVMamba": "G-VMamba", "SegMamba": "SegMamba",
    "BiSegMamba": "BiSegMamba", "MultiSegMamba": "MultiSegMamba", "SegMambaSkip": "SegMambaSkip",
    "Vivim": "Vivim", "VivimV3": "Vivim (ST-Mamba v3)",
}
REFERENCE_PATCH = (128, 128, 128)
REFERENCE_BATCH = 2


def estimator(name: str) -> memory.MemoryEstimator:
    return memory.MemoryEstimator(FAMILY_OF_BENCHMARK[name], collect_networks()[name])


def derive(names) -> dict:
    """Return {family: factor} fitted to the measured 128^3 / batch-2 peaks."""
    factors = {}
    plan = benchmark_plan(REFERENCE_PATCH)
    for name in names:
        family = FAMILY_OF_BENCHMARK[name]
        if family not in memory.MEASURED_PEAKS_GIB:
            continue
        unit = memory.estimate_from_probe(family, estimator(name).probe(plan), REFERENCE_PATCH, REFERENCE_BATCH,
                                          factor=1.0)
        factors[family] = round((memory.MEASURED_PEAKS_GIB[family] * memory.GIB - unit.state_bytes)
                                / unit.activation_bytes, 4)
        print(f"{family:<22} params {unit.state_bytes / memory.STATE_BYTES_PER_PARAMETER / 1e6:7.2f} M  "
              f"fp32 saved {unit.activation_bytes / memory.GIB:7.2f} GiB  factor {factors[family]}", flush=True)
    return factors


def check(names, patches, batch: int, steps: int, warmup: int) -> list:
    """Return one row per (network, patch): estimate, measured peak, relative error."""
    device = torch.device("cuda")
    rows = []
    for name in names:
        family_estimator = estimator(name)
        for patch in patches:
            estimate = family_estimator.estimate(benchmark_plan(patch), batch)
            row = {"network": name, "family": family_estimator.family, "patch_size": list(patch), "batch": batch,
                   "estimate_gib": estimate.peak_allocated_bytes / memory.GIB}
            measured = measure_in_subprocess(name, patch, batch, steps, warmup, device)
            if "error" in measured:
                row["error"] = measured["error"]
            else:
                row["measured_gib"] = measured["train_peak_gib"]
                row["error_pct"] = 100 * (row["estimate_gib"] / row["measured_gib"] - 1)
            rows.append(row)
            shown = (f"{row['measured_gib']:7.2f} GiB  error {row['error_pct']:+6.1f} %" if "measured_gib" in row
                     else row["error"])
            print(f"{name:<14} {str(patch):<16} estimate {row['estimate_gib']:7.2f} GiB  measured {shown}",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="*", help="benchmark names (default: all)")
    parser.add_argument("--patches", nargs="*", type=int, default=[64, 96, 128], help="cubic patch edges")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--derive", action="store_true", help="CPU: print the factors fitted to BENCHMARKS.md")
    parser.add_argument("--json", help="write the rows (or factors) here")
    parser.add_argument("--topology", choices=("isotropic", "anisotropic"), default="isotropic",
                        help="the benchmark plan (4 channels, 6 stages) or an anisotropic one (2 channels, 5 stages)")
    parser.add_argument("--patch-sizes", nargs="*", help="patches as ZxYxX (instead of cubic --patches)")
    args = parser.parse_args(argv)
    os.environ["NNUNETV2_MAMBA_BENCH_TOPOLOGY"] = args.topology  # read by benchmark_plan, here and in the workers
    names = args.networks or list(FAMILY_OF_BENCHMARK)
    unknown = sorted(set(names) - set(FAMILY_OF_BENCHMARK))
    if unknown:
        raise SystemExit(f"Unknown network(s) {unknown}; choose from {list(FAMILY_OF_BENCHMARK)}.")
    if args.derive:
        result = {"factors": derive(names)}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("Measuring needs a CUDA GPU; on the CPU only --derive runs.")
        patches = ([tuple(int(v) for v in p.split("x")) for p in args.patch_sizes] if args.patch_sizes
                   else [(edge,) * 3 for edge in args.patches])
        rows = check(names, patches, args.batch, args.steps, args.warmup)
        errors = [abs(row["error_pct"]) for row in rows if "error_pct" in row]
        within = sum(error <= 15 for error in errors)
        print(f"\n{within}/{len(errors)} measurements within +-15 %"
              + (f"; largest error {max(errors):.1f} %" if errors else ""))
        result = {"header": run_header(torch.device("cuda"), f"batch {args.batch}, fp16 AMP, {args.topology}"),
                  "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
