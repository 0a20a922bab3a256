"""Vivim inference speed on video clips (the paper's setting: 5 x 256 x 256 clips, batch 1); prints a table.

Frames per second = frames per clip x clips per second of the network's forward pass (nnU-Net's sliding window,
pre- and post-processing not included), fp16 autocast on CUDA as nnU-Net predicts, with both mixers. The seed
paper reports 37 FPS on an RTX 3090 for its SegFormer-B3-based model at this clip size.

    python benchmarks/benchmark_vivim.py                         # 5x256x256, batch 1, both mixers
    python benchmarks/benchmark_vivim.py --frames 5 --size 256 384 --repeats 50 --json vivim_fps.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from reporting import report, run_header

ROOT = Path(__file__).resolve().parent


def run(frames: int, height: int, width: int, channels: int, classes: int, batch: int, warmup: int,
        repeats: int, device: torch.device, amp: bool, mixers) -> list:
    """Return one row per mixer: parameters, milliseconds per clip, frames per second, peak memory."""
    from nnunetv2_mamba.evaluation.video_metrics import measure_network_fps
    from nnunetv2_mamba.network_architectures.vivim import Vivim

    rows = []
    for mixer in mixers:
        torch.manual_seed(0)
        network = Vivim(channels, classes, frames, mixer=mixer)
        row = {"mixer": mixer, "params_m": sum(p.numel() for p in network.parameters()) / 1e6}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row.update(measure_network_fps(network, (channels, frames, height, width), device, batch, warmup,
                                           repeats, amp))
            row["peak_gib"] = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                               else float("nan"))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of GPU memory"
        rows.append(row)
        del network
    return rows


def format_table(rows: list) -> str:
    """Return a Markdown table of the rows."""
    lines = ["| mixer | params (M) | ms / clip | FPS | peak memory (GiB) |", "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mixer']} | {row['params_m']:.2f} | {row['error']} | | |")
        else:
            lines.append(f"| {row['mixer']} | {row['params_m']:.2f} | {row['ms_per_clip']:.1f} | {row['fps']:.1f} "
                         f"| {row['peak_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-amp", action="store_true", help="fp32 inference (the reference runs fp32)")
    parser.add_argument("--mixers", nargs="+", default=["alternating", "st_v3"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(args.frames, args.size[0], args.size[1], args.channels, args.classes, args.batch, args.warmup,
               args.repeats, device, not args.no_amp, args.mixers)
    info = run_header(device, f"clip {args.frames}x{args.size[0]}x{args.size[1]}, batch {args.batch}, "
                              f"{'fp16 autocast' if not args.no_amp and device.type == 'cuda' else 'fp32'}, "
                              f"{args.repeats} repeats after {args.warmup} warm-up")
    report(info, format_table(rows), rows, args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent))
    sys.exit(main())
