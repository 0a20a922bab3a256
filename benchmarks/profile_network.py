"""Profile one network's nnU-Net training step on the GPU: CUDA time per kernel group and the top kernels.

    python benchmarks/profile_network.py --networks PlainConvUNet UMambaEnc --steps 3

The step is ``benchmark_networks.py``'s (the 128^3 plan, batch 2, fp16 autocast + GradScaler, deep supervision,
SGD), so the groups add up to what that benchmark times; the scan backend follows $NNUNETV2_MAMBA_BACKEND as there.
Kernels are grouped by name (scan, conv, GEMM, norm, copy, reduction, elementwise) to show where a Mamba network's
step goes beyond PlainConvUNet's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_networks import benchmark_plan, collect_networks, deep_supervision_loss  # noqa: E402
from profiling import group_times, kernel_table, profile_steps  # noqa: E402
from reporting import set_cudnn_benchmark  # noqa: E402


def profile_network(name: str, patch_size, batch: int, steps: int, warmup: int, channels_last: bool = False):
    """Return ({kernel: CUDA ms per step}, peak GiB) of the network's training step (``channels_last``: network
    and input in channels-last memory format, to see what cuDNN's layout conversions cost)."""
    plan = benchmark_plan(patch_size)
    torch.manual_seed(0)
    network = collect_networks()[name](plan, True).cuda().train()
    memory_format = (torch.channels_last_3d if len(patch_size) == 3 else torch.channels_last) if channels_last \
        else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda")
    data = torch.randn(batch, plan.input_channels, *plan.patch_size, device="cuda").contiguous(
        memory_format=memory_format)
    target = torch.randint(0, plan.num_classes, (batch, *plan.patch_size), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = deep_supervision_loss(network(data), target)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        scaler.step(optimizer)
        scaler.update()

    kernels = profile_steps(step, steps, warmup)
    return kernels, torch.cuda.max_memory_allocated() / 2 ** 30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", default=["PlainConvUNet", "UMambaEnc"])
    parser.add_argument("--patch", type=int, nargs="+", default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--channels-last", action="store_true", help="network and input in channels-last format")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_network.py needs a CUDA GPU.")
    unknown = sorted(set(args.networks) - set(collect_networks()))
    if unknown:
        raise SystemExit(f"Unknown network(s) {unknown}; choose from {list(collect_networks())}.")
    cudnn_benchmark = set_cudnn_benchmark()  # as nnUNetv2_train runs
    print(f"device: {torch.cuda.get_device_name()}, cudnn.benchmark {cudnn_benchmark}, patch {args.patch}, "
          f"batch {args.batch}, CUDA ms per training "
          f"step ({args.steps} profiled after {args.warmup} warm-up)")
    for name in args.networks:
        kernels, peak = profile_network(name, args.patch, args.batch, args.steps, args.warmup, args.channels_last)
        print(f"\n{name}{' (channels last)' if args.channels_last else ''}: {sum(kernels.values()):.1f} ms of kernels per step, peak {peak:.2f} GiB; by group: "
              f"{group_times(kernels)}")
        print(kernel_table(kernels, args.top))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
