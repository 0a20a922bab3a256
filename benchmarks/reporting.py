"""What every benchmark script ends with: a header line naming the machine, the Markdown table, optional JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import torch


CUDNN_BENCHMARK_ENV_VAR = "NNUNETV2_MAMBA_BENCH_CUDNN_BENCHMARK"


def set_cudnn_benchmark() -> bool:
    """Set ``torch.backends.cudnn.benchmark`` as nnU-Net's training runs it (True: ``nnUNetv2_train`` sets it before
    training, so cuDNN times its algorithms on the first step of each shape); ``$NNUNETV2_MAMBA_BENCH_CUDNN_BENCHMARK=0``
    keeps cuDNN's heuristic choice (what these scripts measured before 2026-12-03's eighth session). Return it."""
    enabled = os.environ.get(CUDNN_BENCHMARK_ENV_VAR, "1").strip() not in ("0", "")
    torch.backends.cudnn.benchmark = enabled
    return enabled


def run_header(device: torch.device, settings: str) -> str:
    """Return "device: <GPU name or cpu>, torch <version>, <settings>" for the top of a benchmark's output."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cudnn = f", cudnn.benchmark {torch.backends.cudnn.benchmark}" if device.type == "cuda" else ""
    return f"device: {name}, torch {torch.__version__}{cudnn}, {settings}"


def report(info: str, table: str, rows: List[dict], json_path: Optional[str]) -> None:
    """Print the header and the table; also write {"info", "rows"} to ``json_path`` when one is given."""
    print(info)
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
