"""Development check for the Triton scan on a GPU: correctness against mamba_ssm / fp64 and timings of variants.

    python benchmarks/triton_dev.py [--quick]

Prints one line per check and a table of medians (ms); see benchmarks/TRITON_NOTES.md for the record.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nnunetv2_mamba.ssm.backends.triton_scan import selective_scan_triton


def make(batch, channels, length, d_state, bc="shared", dtype=torch.float32, layout="bdl", seed=0, groups=2):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    def tokens(scale=1.0):
        if layout == "bdl":
            return (randn(batch, channels, length) * scale).to(dtype)
        return (randn(batch, length, channels) * scale).to(dtype).transpose(1, 2)  # (B, D, L) view, d fastest

    u, delta, z = tokens(), tokens(0.5) - 1.0, tokens()
    A = -torch.exp(torch.rand(channels, d_state, generator=g, device="cuda") * 2.5)
    if bc == "shared":
        if layout == "bdl":
            B, C = randn(batch, d_state, length).to(dtype), randn(batch, d_state, length).to(dtype)
        else:
            B = randn(batch, length, d_state).to(dtype).transpose(1, 2)
            C = randn(batch, length, d_state).to(dtype).transpose(1, 2)
    elif bc == "grouped":
        B, C = randn(batch, groups, d_state, length).to(dtype), randn(batch, groups, d_state, length).to(dtype)
    else:
        B, C = randn(channels, d_state), randn(channels, d_state)
    D = randn(channels)
    bias = randn(channels) * 0.3
    return [u, delta, A, B, C, D, z, bias]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(fn, inputs, w):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out.float() * w).sum(), leaves)
    return out.detach(), grads


def check(name, batch, channels, length, d_state, bc, dtype, layout="bdl", **cfg):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    inputs = make(batch, channels, length, d_state, bc, dtype, layout)
    w = torch.randn(batch, channels, length, device="cuda")
    ours = lambda *a: selective_scan_triton(*a, delta_softplus=True, **cfg)

    def theirs(u, delta, A, B, C, D, z, bias):
        return selective_scan_fn(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D,
                                 z.contiguous(), bias, True)
    o1, g1 = grads_of(ours, inputs, w)
    o2, g2 = grads_of(theirs, inputs, w)
    # fp64 reference through the torch backend on upcast inputs (the ground truth for both)
    from nnunetv2_mamba.ssm.backends.torch_scan import selective_scan_torch
    o3, g3 = grads_of(lambda *a: selective_scan_torch(*a, delta_softplus=True), [t.double() for t in inputs], w.double())
    errs = [rel(o1, o3), rel(o2, o3)] + [max(rel(a, c), 0) for a, c in zip(g1, g3)] + [rel(b, c) for b, c in zip(g2, g3)]
    n = len(g1)
    print(f"CHECK {name}: out ours {errs[0]:.1e} mamba {errs[1]:.1e} | grads ours "
          + " ".join(f"{e:.1e}" for e in errs[2:2 + n]) + " | mamba " + " ".join(f"{e:.1e}" for e in errs[2 + n:]),
          flush=True)
    assert all(e == e for e in errs), "NaN"


def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def bench_scan(label, inputs, fn, rows):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.no_grad():
        fwd = timed(lambda: fn(*leaves))
    out = fn(*leaves)
    gout = torch.randn_like(out)
    del out

    def both():
        o = fn(*leaves)
        torch.autograd.backward(o, gout)
    both_ms = timed(both)
    torch.cuda.reset_peak_memory_stats()
    rows.append((label, fwd, both_ms))
    print(f"TIME {label}: fwd {fwd:.2f} ms, fwd+bwd {both_ms:.2f} ms", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--configs", default="16:8:4,32:8:4,16:2:1,32:4:2,16:16:8")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--layouts", default="bdl,bld")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    x = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    print(f"copy bandwidth (read+write): {2 * 2 ** 30 / ms / 1e6:.0f} GB/s", flush=True)
    del x, y
    if not args.skip_check:
        for length in ((2049,) if args.quick else (1, 7, 2048, 2049, 65536)):
            for bc in ("shared", "grouped"):
                check(f"L={length} {bc} fp32", 2, 16, length, 16, bc, torch.float32)
        check("L=65536 shared bf16", 2, 16, 65536, 16, "shared", torch.bfloat16)
        if not args.quick:
            check("L=65536 shared fp16", 2, 16, 65536, 16, "shared", torch.float16)
            check("L=4097 time_invariant fp32", 2, 16, 4097, 16, "ti", torch.float32)
        check("L=2^21 shared fp32 (B,L,D) strided", 1, 8, 128 ** 3, 16, "shared", torch.float32, "bld")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    rows = []
    for layout in args.layouts.split(","):
        inputs = make(2, 64, 128 ** 3, 16, "shared", torch.float32, layout)
        if layout == "bdl":
            bench_scan("mamba_ssm bdl", inputs, lambda u, dl, A, B, C, D, z, b: selective_scan_fn(
                u, dl, A, B, C, D, z, b, True), rows)
        for cfg in args.configs.split(","):
            chunk, block_d, warps = (int(v) for v in cfg.split(":"))
            try:
                bench_scan(f"triton {layout} T={chunk} BD={block_d} w={warps}", inputs,
                           lambda *a: selective_scan_triton(*a, delta_softplus=True, chunk=chunk, block_d=block_d,
                                                            warps=warps), rows)
            except Exception as error:
                print(f"FAIL {cfg}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        del inputs
        torch.cuda.empty_cache()
    inputs = make(2, 64, 128 ** 3, 16, "shared", torch.float32, "bdl")
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    from torch.profiler import profile, ProfilerActivity
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            o = selective_scan_triton(*leaves, delta_softplus=True)
            o.backward(torch.ones_like(o))
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))
    del inputs, leaves
    from nnunetv2_mamba.ssm.backends import triton_scan as ts
    for kernel in (ts._segment_end_state_kernel, ts._chunk_carry_kernel, ts._segment_output_kernel,
                   ts._segment_adjoint_kernel, ts._chunk_grad_kernel):
        try:
            for cache in kernel.device_caches.values():
                for key, compiled in cache[0].items():
                    print(f"REGS {kernel.fn.__name__}: regs {compiled.n_regs} spills {compiled.n_spills} "
                          f"shared {compiled.metadata.shared}", flush=True)
        except Exception as error:
            print("REGS n/a", type(error).__name__, error)
    print("| variant | fwd ms | fwd+bwd ms |")
    for label, f, b in rows:
        print(f"| {label} | {f:.2f} | {b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
