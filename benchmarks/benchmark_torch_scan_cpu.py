"""CPU time of the torch scan at U-Mamba's 3D demo-patch stage shapes, against an earlier torch_scan.py (A/B).

    git show REV:nnunetv2_mamba/ssm/backends/torch_scan.py > /tmp/torch_scan_before.py
    python benchmarks/benchmark_torch_scan_cpu.py /tmp/torch_scan_before.py --threads 2 --repeats 3

Shapes are those of U-Mamba-Enc's mixers at the 48³ patch, batch 2 (stage 0: 64 channels, 110592 tokens; stage 1:
128 channels, 13824 tokens) and U-Mamba-Bot's bottleneck (512 channels, 216 tokens), d_state 16, with the
inputs laid out as the Mamba layer gives them (dt, B, C, z views of token-major memory). Each row times the
no-grad forward and the forward + backward; the two implementations alternate within every repeat, so load on a
shared machine hits both. Minimum and median of the process CPU time are printed.
"""
import argparse
import importlib.util
import statistics
import time

import torch

SHAPES = [(2, 64, 16, 48 ** 3), (2, 128, 16, 24 ** 3), (2, 512, 16, 6 ** 3)]


def load_module(path):
    spec = importlib.util.spec_from_file_location("torch_scan_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(batch, channels, d_state, length, requires_grad):
    generator = torch.Generator().manual_seed(0)
    x_dbl = torch.randn(batch, length, 2 * d_state, generator=generator)
    u = torch.randn(batch, length, channels, generator=generator).transpose(1, 2)
    delta = (torch.randn(batch, length, channels, generator=generator) * 0.5).transpose(1, 2)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1)
    B, C = x_dbl[..., :d_state].transpose(1, 2), x_dbl[..., d_state:].transpose(1, 2)
    D = torch.ones(channels)
    z = torch.randn(batch, length, 2 * channels, generator=generator)[..., channels:].transpose(1, 2)
    delta_bias = torch.full((channels,), -3.0)  # softplus(-3 + N(0, 0.5)) ~ 0.05: Mamba's initial dt range
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    return [t.detach().clone().requires_grad_() for t in inputs] if requires_grad else inputs


def run_once(scan, inputs, backward):
    if backward:
        out = scan(*inputs, delta_softplus=True)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            scan(*inputs, delta_softplus=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="path of the earlier torch_scan.py to compare with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nnunetv2_mamba.ssm.backends.torch_scan import selective_scan_torch
    scans = {"before": load_module(args.before).selective_scan_torch, "after": selective_scan_torch}
    for shape in SHAPES[:args.shapes]:
        for backward in (False, True):
            times = {name: [] for name in scans}
            for _ in range(args.repeats):
                for name, scan in scans.items():
                    inputs = make_inputs(*shape, requires_grad=backward)
                    start = time.process_time()
                    run_once(scan, inputs, backward)
                    times[name].append(time.process_time() - start)
            cells = "  ".join(f"{name} min {min(v):6.3f} s med {statistics.median(v):6.3f} s"
                              for name, v in times.items())
            ratio = min(times["before"]) / min(times["after"])
            print(f"batch {shape[0]} channels {shape[1]:3d} d_state {shape[2]} tokens {shape[3]:6d} "
                  f"{'fwd+bwd' if backward else 'no-grad'}: {cells}  speed-up {ratio:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
