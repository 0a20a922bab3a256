"""Profile one Mamba layer's forward + backward on the GPU: CUDA time per kernel, grouped, per backend; prints tables.

    python benchmarks/profile_layer.py --shape 2x2097152x32 --dtype bf16 --backends triton mamba_ssm

For each backend: a few warm-up steps, then ``--steps`` steps under ``torch.profiler``; the table lists the kernels
by CUDA time per step with a coarse group (scan, conv, GEMM, elementwise, copy, reduction), so that the part of the
layer outside the scan can be compared between backends (BENCHMARKS.md, 2026-12-02: the triton layer is slower
under bf16 autocast than in fp32, mamba_ssm faster).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import group_times, kernel_table, profile_steps  # noqa: E402

from nnunetv2_mamba.layers import Mamba  # noqa: E402

def profile_backend(backend: str, shape, dtype, steps: int, warmup: int):
    batch, length, d_model = shape
    torch.manual_seed(0)
    layer = Mamba(d_model, backend=backend).cuda()
    tokens = torch.randn(batch, length, d_model, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = layer(tokens)
        out.float().square().mean().backward()

    return profile_steps(step, steps, warmup)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2x2097152x32", help="batch x tokens x d_model")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                        help="fp32, or autocast to bf16 / fp16")
    parser.add_argument("--backends", nargs="+", default=["triton", "mamba_ssm"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_layer.py needs a CUDA GPU.")
    shape = tuple(int(v) for v in args.shape.split("x"))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, Mamba({shape[2]}) on {shape[0]} x {shape[1]} tokens, "
          f"{args.dtype}, CUDA ms per forward + backward step ({args.steps} profiled after {args.warmup} warm-up)")
    for backend in args.backends:
        kernels = profile_backend(backend, shape, dtype, args.steps, args.warmup)
        print(f"\n{backend}: {sum(kernels.values()):.1f} ms in all; by group: {group_times(kernels)}")
        print(kernel_table(kernels, args.top, width=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
