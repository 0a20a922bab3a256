"""Benchmark the Mamba layer on every available scan backend; prints a table of medians.

    python benchmarks/benchmark_scan.py                     # (2, 128^3, 32) and (2, 64^3, 64), fp32
    python benchmarks/benchmark_scan.py --shapes 2x32768x64 --dtype bf16
    python benchmarks/benchmark_scan.py --shapes 2x262144x64x64 --dtype bf16   # d_state 64 (SegMamba's stage 1)
    python benchmarks/benchmark_scan.py --device cpu --shapes 2x32768x32 --steps 3 --warmup 1

Rows: forward and forward+backward milliseconds and peak memory per backend, with the ratio to the fastest
row of the same shape. ``--raw`` adds a table for the bare selective scan (no projections or conv) at
batch x tokens x d_inner with d_state 16 and shared B/C, as the layer calls it. When mamba_ssm is installed, a last row measures its own ``mamba_ssm.Mamba`` module
loaded with the same weights, the upstream layer our parameter names follow.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nnunetv2_mamba.layers import Mamba
from nnunetv2_mamba.ssm import describe_backends, get_backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(layer, tokens, backward: bool, steps: int, warmup: int) -> float:
    """Return the median milliseconds of forward (and backward) passes."""
    times = []
    for step in range(warmup + steps):
        _sync(tokens.device)
        started = time.perf_counter()
        if backward:
            layer(tokens).float().square().mean().backward()
        else:
            with torch.no_grad():
                layer(tokens)
        _sync(tokens.device)
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def upstream_layer(layer: Mamba):
    """Return mamba_ssm's own Mamba module with ``layer``'s weights, or None if mamba_ssm is not importable."""
    try:
        from mamba_ssm import Mamba as UpstreamMamba
    except Exception:
        return None
    upstream = UpstreamMamba(d_model=layer.d_model, d_state=layer.d_state, d_conv=layer.d_conv,
                             expand=layer.expand).to(layer.A_log.device)
    upstream.load_state_dict(layer.state_dict())
    return upstream


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2x2097152x32", "2x262144x64"],
                        help="batch x tokens x d_model[x d_state] (d_state 16 when left out)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 inputs, or fp32 weights under autocast to bf16/fp16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--raw", nargs="*", default=None, metavar="BxLxD",
                        help="also time the bare scan at these batch x tokens x d_inner shapes (none given: "
                             "2x2097152x64 and 2x4096x1024)")
    parser.add_argument("--backends", nargs="*", default=None,
                        help="only these backends (default: every available one)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    probe = torch.zeros(1, 1, 1, device=device)
    backends = [row["name"] for row in describe_backends()
                if row["available"] and get_backend(row["name"]).supports(probe, probe[0])
                and (args.backends is None or row["name"] in args.backends)]
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, {args.dtype}, medians of {args.steps} after "
          f"{args.warmup} warm-up")
    print("| shape (B x L x d) | backend | forward (ms) | fwd+bwd (ms) | peak fwd+bwd (GiB) | fwd+bwd x fastest |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        fields = [int(v) for v in shape.split("x")]
        if len(fields) not in (3, 4):
            raise SystemExit(f"--shapes {shape!r}: give batch x tokens x d_model, optionally x d_state.")
        batch, length, d_model, d_state = fields if len(fields) == 4 else fields + [16]
        rows = []
        candidates = [(name, lambda name=name: Mamba(d_model, d_state, backend=name).to(device)) for name in backends]
        if device.type == "cuda" and "mamba_ssm" in backends:
            candidates.append(("upstream mamba_ssm.Mamba",
                               lambda: upstream_layer(Mamba(d_model, d_state, backend="mamba_ssm").to(device))))
        for name, make_layer in candidates:
            torch.manual_seed(0)
            layer = make_layer()
            tokens = torch.randn(batch, length, d_model, device=device, requires_grad=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                forward = measure(layer, tokens, False, args.steps, args.warmup)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                both = measure(layer, tokens, True, args.steps, args.warmup)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
            rows.append((name, forward, both, peak))
            del layer, tokens
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fastest = min(row[2] for row in rows)
        for name, forward, both, peak in rows:
            peak_text = "n/a" if peak != peak else f"{peak:.2f}"  # no allocator statistics on the CPU
            print(f"| {shape} | {name} | {forward:.1f} | {both:.1f} | {peak_text} | {both / fastest:.2f} |")
    if args.raw is not None:
        raw_table(args.raw or ["2x2097152x64", "2x4096x1024"], backends, device, args.steps, args.warmup)
    return 0


def raw_table(shapes, backends, device, steps, warmup) -> None:
    """Print forward and forward+backward medians of the bare scan per backend (fp32 inputs)."""
    from nnunetv2_mamba.ssm import selective_scan

    print("| raw scan (B x L x d_inner, d_state 16) | backend | forward (ms) | fwd+bwd (ms) | fwd+bwd x fastest |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        batch, length, channels = (int(v) for v in shape.split("x"))
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*size):
            return torch.randn(*size, generator=generator, device=device)

        u, z = randn(batch, channels, length), randn(batch, channels, length)
        delta = randn(batch, channels, length) * 0.5 - 1.0
        A = -torch.exp(torch.rand(channels, 16, generator=generator, device=device) * 2.5)
        B, C = randn(batch, 16, length), randn(batch, 16, length)
        D, bias = randn(channels), randn(channels) * 0.3
        leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
        grad = torch.randn_like(u)
        rows = []
        for name in backends:
            if name == "torch" and device.type == "cuda":
                continue  # seconds per step at these sizes; the layer table above has it

            def forward_only(name=name):
                with torch.no_grad():
                    selective_scan(*leaves, delta_softplus=True, backend=name)

            def forward_backward(name=name):
                out = selective_scan(*leaves, delta_softplus=True, backend=name)
                torch.autograd.grad(out, leaves, grad)

            rows.append((name, _median_ms(forward_only, device, steps, warmup),
                         _median_ms(forward_backward, device, steps, warmup)))
        fastest = min(row[2] for row in rows)
        for name, forward, both in rows:
            print(f"| {shape} | {name} | {forward:.2f} | {both:.2f} | {both / fastest:.2f} |")


def _median_ms(fn, device, steps, warmup) -> float:
    times = []
    for step in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
