"""Benchmark the Mamba layer on every available scan backend; prints a table of medians.

    python benchmarks/benchmark_scan.py                     # (2, 128^3, 32) and (2, 64^3, 64), fp32
    python benchmarks/benchmark_scan.py --shapes 2x32768x64 --dtype bf16

Rows: forward and forward+backward milliseconds and peak memory per backend, with the ratio to the fastest
backend of the same shape.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nnunetv2_mamba.layers import Mamba
from nnunetv2_mamba.ssm import describe_backends


def measure(layer, tokens, backward: bool, steps: int, warmup: int) -> float:
    """Return the median milliseconds of forward (and backward) passes."""
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        if backward:
            layer(tokens).float().square().mean().backward()
        else:
            with torch.no_grad():
                layer(tokens)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2x2097152x32", "2x262144x64"],
                        help="batch x tokens x d_model")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 inputs, or fp32 weights under autocast to bf16/fp16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    backends = [row["name"] for row in describe_backends() if row["available"]]
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, medians of "
          f"{args.steps} after {args.warmup} warm-up")
    print("| shape (B x L x d) | backend | forward (ms) | fwd+bwd (ms) | peak fwd+bwd (GiB) | fwd+bwd x fastest |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        batch, length, d_model = (int(v) for v in shape.split("x"))
        rows = []
        for name in backends:
            torch.manual_seed(0)
            layer = Mamba(d_model, backend=name).cuda()
            tokens = torch.randn(batch, length, d_model, device="cuda", requires_grad=True)
            with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
                forward = measure(layer, tokens, False, args.steps, args.warmup)
                torch.cuda.reset_peak_memory_stats()
                both = measure(layer, tokens, True, args.steps, args.warmup)
            rows.append((name, forward, both, torch.cuda.max_memory_allocated() / 2 ** 30))
            del layer, tokens
            torch.cuda.empty_cache()
        fastest = min(row[2] for row in rows)
        for name, forward, both, peak in rows:
            print(f"| {shape} | {name} | {forward:.1f} | {both:.1f} | {peak:.2f} | {both / fastest:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
