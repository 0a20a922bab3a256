"""Bytes one Mamba layer on the triton backend keeps for its backward, per token, per layer variant (CPU; prints a table).

    python benchmarks/layer_saved_bytes.py --length 256 --d-model 32

Runs the Triton kernels in the interpreter (TRITON_INTERPRET=1 on CPU tensors, fp32) and counts what autograd saves
as the memory planner counts it (``planning.memory.count_saved_bytes``: every storage once, parameters left out, the
layer's input and output included) for: the unfused layer with torch's grouped conv, the unfused layer with the
Triton causal conv (``$NNUNETV2_MAMBA_TRITON_CONV=1``), and the fused inner Function (``$NNUNETV2_MAMBA_TRITON_FUSED=1``). What is kept is what the GPU keeps at the same shape (the
chunk-start states are recomputed, so the count does not depend on the chunk size); in bf16 halve the figures.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from nnunetv2_mamba.layers import Mamba  # noqa: E402
from nnunetv2_mamba.planning.memory import count_saved_bytes  # noqa: E402

VARIANTS = (("unfused, torch conv", "0", "0"), ("unfused, Triton conv", "1", "0"), ("fused Function", "1", "1"))


def saved_bytes_per_token(conv: str, fused: str, length: int, d_model: int) -> float:
    os.environ["NNUNETV2_MAMBA_TRITON_CONV"], os.environ["NNUNETV2_MAMBA_TRITON_FUSED"] = conv, fused
    torch.manual_seed(0)
    layer = Mamba(d_model=d_model, backend="triton")
    tokens = torch.randn(2, length, d_model, requires_grad=True)
    return count_saved_bytes(layer, tokens) / tokens.shape[0] / length


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"Mamba({args.d_model}) (d_inner {2 * args.d_model}, d_state 16), fp32, batch 2 x {args.length} tokens")
    print("| layer | kept for the backward (bytes / token) |\n|---|---|")
    for label, conv, fused in VARIANTS:
        print(f"| {label} | {saved_bytes_per_token(conv, fused, args.length, args.d_model):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
