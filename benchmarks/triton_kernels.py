"""Per-kernel CUDA time of the Triton scan's forward + backward for several tilings, layouts and dtypes (GPU).

    python benchmarks/triton_kernels.py --cases bf16:bld:4:1 fp32:bld:4:1 bf16:bdl:4:1 ...

A case is ``dtype:layout:channels per tile:warps``, an optional ``:T`` last (tokens per chunk). Layout ``bld``
is the Mamba layer's (token-major u, delta, z, dout and (B, L, N) views of B and C), ``bdl`` (B, D, L)-contiguous.
Shape: the raw scan of ``Mamba(d_model=32)`` at 2 x 128^3 tokens (d_inner 64, d_state 16, shared B/C, D, z and
delta_bias, softplus). Prints, per case, the median fwd+bwd (CUDA events) and the kernels' time per step from
``torch.profiler``; then one table of all cases (benchmarks/TRITON_NOTES.md keeps the record).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import kernel_times  # noqa: E402
from triton_dev import make, timed  # noqa: E402

from nnunetv2_mamba.ssm.backends.triton_scan import selective_scan_triton  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(case: str):
    dtype, layout, block_d, warps, *chunk = case.split(":")
    return dtype, layout, int(block_d), int(warps), int(chunk[0]) if chunk else None


def run_case(case: str, length: int, steps: int):
    dtype, layout, block_d, warps, chunk = parse(case)
    inputs = make(2, 64, length, 16, "shared", DTYPES[dtype], layout)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    scan = lambda: selective_scan_triton(*leaves, delta_softplus=True, chunk=chunk, block_d=block_d, warps=warps)
    grad = torch.randn_like(scan())

    def step():
        torch.autograd.backward(scan(), grad)

    with torch.no_grad():
        forward_ms = timed(scan, reps=steps)
    both_ms = timed(step, reps=steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    times = kernel_times(prof, 2)
    print(f"== {case}: fwd {forward_ms:.2f} ms, fwd+bwd {both_ms:.2f} ms", flush=True)
    for name, ms in times.most_common(10):
        print(f"   {ms:8.2f} ms  {name[:90]}", flush=True)
    del inputs, leaves, grad
    torch.cuda.empty_cache()
    scan_kernels = {short: sum(ms for name, ms in times.items() if short in name)
                    for short in ("end_state", "carry", "output", "adjoint", "grad_kernel")}
    return forward_ms, both_ms, scan_kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["bf16:bld:4:1", "bf16:bdl:4:1"])
    parser.add_argument("--length", type=int, default=128 ** 3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--transpose", action="store_true",
                        help="also time torch's transposing copy of a (2, L, 64) tensor to (2, 64, L)")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.transpose:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(2, args.length, 64, device="cuda").to(dtype)
            ms = timed(lambda: x.transpose(1, 2).contiguous())
            print(f"TRANSPOSE {dtype}: {ms:.2f} ms for {x.numel() * x.element_size() / 1e9:.2f} GB", flush=True)
            del x
    rows = []
    for case in args.cases:
        try:
            rows.append((case, *run_case(case, args.length, args.steps)))
        except Exception as error:  # a tiling that does not compile or launch: report it, go on
            print(f"FAIL {case}: {type(error).__name__}: {str(error)[:300]}", flush=True)
    print("| case | fwd ms | fwd+bwd ms | end state | carry | output | adjoint | grad |")
    print("|---|---|---|---|---|---|---|---|")
    for case, forward_ms, both_ms, k in rows:
        print(f"| {case} | {forward_ms:.2f} | {both_ms:.2f} | " + " | ".join(f"{k[name]:.2f}" for name in k) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
