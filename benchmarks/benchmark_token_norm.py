"""The Mamba layers' LayerNorm of a map's tokens: torch's path vs the Triton token LayerNorm (GPU).

    python benchmarks/benchmark_token_norm.py [--shapes 2x32x2097152 ...] [--steps 20]

What a U-Mamba layer does before its first projection, forward + backward, under bf16 autocast on an fp16 map (what
nnU-Net's fp16 convolution hands it): torch's path is ``LayerNorm(map.flatten(2).transpose(1, 2))`` (a transposing
copy, fp32 tokens) and the projection's cast to bf16; the Triton path is ``token_layer_norm`` (bf16 tokens). Prints
the median ms (CUDA events) of each and the ratio, measured in one run; `--json` also writes the rows.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reporting import report, run_header  # noqa: E402
from triton_dev import timed  # noqa: E402

from nnunetv2_mamba.layers.norm import FAST_NORM_ENV_VAR, token_layer_norm  # noqa: E402

DEFAULT_SHAPES = ["2x32x2097152", "2x64x262144", "2x128x32768", "2x320x512"]


def step(norm: nn.LayerNorm, x: torch.Tensor, grad: torch.Tensor, fast: bool):
    """Return a function running one forward + backward of the LayerNorm and the bf16 cast the projection does
    (torch's path, or with ``fast`` the Triton kernels)."""
    def run():
        os.environ[FAST_NORM_ENV_VAR] = "1" if fast else "0"  # token_layer_norm reads it per call
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tokens = token_layer_norm(x, norm).to(torch.bfloat16)  # a no-op for the Triton path's bf16 tokens
        tokens.backward(grad)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch x channels x tokens")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows, lines = [], ["| map (B x C x L) | torch ms | triton ms | torch / triton |", "|---|---|---|---|"]
    for shape in args.shapes:
        batch, channels, length = (int(v) for v in shape.split("x"))
        norm = nn.LayerNorm(channels).cuda()
        x = torch.randn(batch, channels, length, device="cuda", dtype=torch.float16).requires_grad_()
        grad = torch.randn(batch, length, channels, device="cuda", dtype=torch.bfloat16)
        torch_ms = timed(step(norm, x, grad, fast=False), reps=args.steps, warmup=3)
        triton_ms = timed(step(norm, x, grad, fast=True), reps=args.steps, warmup=3)
        rows.append(dict(shape=shape, torch_ms=torch_ms, triton_ms=triton_ms))
        lines.append(f"| {shape} | {torch_ms:.3f} | {triton_ms:.3f} | {torch_ms / triton_ms:.2f} |")
    os.environ.pop(FAST_NORM_ENV_VAR, None)
    report(run_header(torch.device("cuda"), f"fp16 map, bf16 autocast, fwd+bwd, median of {args.steps}"),
           "\n".join(lines), rows, args.json)


if __name__ == "__main__":
    main()
