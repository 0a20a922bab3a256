"""Bytes one Mamba layer on the triton backend keeps for its backward, per token, per layer variant (CPU; prints a table).

    python benchmarks/layer_saved_bytes.py --length 256 --d-model 32

Runs the Triton kernels in the interpreter (TRITON_INTERPRET=1 on CPU tensors, fp32) and counts the storages autograd
saves (``torch.autograd.graph.saved_tensors_hooks``; parameters and the layer input left out) for: the unfused layer
with torch's grouped conv, the unfused layer with the Triton causal conv (``$NNUNETV2_MAMBA_TRITON_CONV=1``), and the
fused inner Function (``$NNUNETV2_MAMBA_TRITON_FUSED=1``). What is kept is what the GPU keeps at the same shape (the
chunk-start states are recomputed, so the count does not depend on the chunk size); in bf16 halve the figures.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from nnunetv2_mamba.layers import Mamba  # noqa: E402

VARIANTS = (("unfused, torch conv", "0", "0"), ("unfused, Triton conv", "1", "0"), ("fused Function", "1", "1"))


def saved_bytes_per_token(conv: str, fused: str, length: int, d_model: int) -> float:
    os.environ["NNUNETV2_MAMBA_TRITON_CONV"], os.environ["NNUNETV2_MAMBA_TRITON_FUSED"] = conv, fused
    torch.manual_seed(0)
    layer = Mamba(d_model=d_model, backend="triton")
    tokens = torch.randn(2, length, d_model, requires_grad=True)
    left_out = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {tokens.untyped_storage().data_ptr()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in left_out:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(tokens)
    return sum(saved.values()) / tokens.shape[0] / length


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
