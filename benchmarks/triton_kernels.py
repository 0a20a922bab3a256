"""Per-kernel CUDA time of the Triton scan's forward + backward for several tilings, layouts and dtypes (GPU).

    python benchmarks/triton_kernels.py --cases bf16:bld:4:1 fp32:bld:4:1 bf16:bdl:4:1 ...

A case is ``dtype:layout:channels per tile:warps``, optionally ``:T`` (tokens per chunk) and ``:S`` (chunks per
segment) last; warps ``W/G`` give the gradient kernel G warps and the others W (``W`` alone: all W). Layout ``bld``
is the Mamba layer's (token-major u, delta, z, dout and (B, L, N) views of B and C), ``bdl`` (B, D, L)-contiguous.
Shape: the raw scan of ``Mamba(d_model=32)`` at 2 x 128^3 tokens (d_inner 64, d_state 16, shared B/C, D, z and
delta_bias, softplus); ``--length``, ``--channels`` and ``--d-state`` change it. Prints, per case, the median fwd+bwd
(CUDA events), its peak memory and the kernels' time per step from ``torch.profiler``; then one table of all cases
(benchmarks/TRITON_NOTES.md keeps the record).
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
from triton_dev import make, rel, timed  # noqa: E402

from nnunetv2_mamba.ssm.backends.triton_scan import selective_scan_triton  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(case: str):
    dtype, layout, block_d, warps, *rest = case.split(":")
    chunk, segment = (int(v) for v in rest + ["0"] * (2 - len(rest)))
    warps, _, grad_warps = warps.partition("/")
    return dtype, layout, int(block_d), int(warps), int(grad_warps or warps), chunk or None, segment or None


def run_case(case: str, length: int, steps: int, channels: int = 64, d_state: int = 16):
    dtype, layout, block_d, warps, grad_warps, chunk, segment = parse(case)
    if segment:
        os.environ["NNUNETV2_MAMBA_TRITON_SEGMENT"] = str(segment)  # read at every call
    else:
        os.environ.pop("NNUNETV2_MAMBA_TRITON_SEGMENT", None)
    inputs = make(2, channels, length, d_state, "shared", DTYPES[dtype], layout)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    scan = lambda: selective_scan_triton(*leaves, delta_softplus=True, chunk=chunk, block_d=block_d, warps=warps,
                                        grad_warps=grad_warps)
    out = scan()  # the same seeded gradient for every case (their results are compared)
    grad = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda").to(out.dtype)
    del out

    def step():
        torch.autograd.backward(scan(), grad)

    with torch.no_grad():
        forward_ms = timed(scan, reps=steps)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    both_ms = timed(step, reps=steps)
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    times = kernel_times(prof, 2)
    for leaf in leaves:
        leaf.grad = None
    out = scan()
    torch.autograd.backward(out, grad)
    results = [out.detach().float()] + [leaf.grad.float() for leaf in leaves]
    print(f"== {case}: fwd {forward_ms:.2f} ms, fwd+bwd {both_ms:.2f} ms, {peak_gib:.2f} GiB above the inputs",
          flush=True)
    for name, ms in times.most_common(10):
        print(f"   {ms:8.2f} ms  {name[:90]}", flush=True)
    del inputs, leaves, grad
    torch.cuda.empty_cache()
    scan_kernels = {short: sum(ms for name, ms in times.items() if short in name)
                    for short in ("end_state", "carry", "output", "adjoint", "grad_kernel")}
    return forward_ms, both_ms, peak_gib, scan_kernels, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["bf16:bld:4:1", "bf16:bdl:4:1"])
    parser.add_argument("--length", type=int, default=128 ** 3)
    parser.add_argument("--channels", type=int, default=64, help="d_inner")
    parser.add_argument("--d-state", type=int, default=16)
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
    rows, reference = [], None
    for case in args.cases:
        try:
            *row, results = run_case(case, args.length, args.steps, args.channels, args.d_state)
        except Exception as error:  # a tiling that does not compile or launch: report it, go on
            print(f"FAIL {case}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        # every tiling computes the same thing: its output and gradients against the first case's (same inputs)
        reference = reference or results
        worst = max(rel(mine, ref) for mine, ref in zip(results, reference))
        rows.append((case, *row, worst))
        del results
    print(f"2 x {args.length} tokens, d_inner {args.channels}, d_state {args.d_state}")
    print("| case | fwd ms | fwd+bwd ms | GiB above inputs | end state | carry | output | adjoint | grad | "
          "worst rel. diff. to the first case |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, forward_ms, both_ms, peak_gib, k, worst in rows:
        print(f"| {case} | {forward_ms:.2f} | {both_ms:.2f} | {peak_gib:.2f} | "
              + " | ".join(f"{k[name]:.2f}" for name in k) + f" | {worst:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
