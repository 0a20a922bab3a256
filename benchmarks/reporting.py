"""What every benchmark script ends with: a header line naming the machine, the Markdown table, optional JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch


def run_header(device: torch.device, settings: str) -> str:
    """Return "device: <GPU name or cpu>, torch <version>, <settings>" for the top of a benchmark's output."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device: {name}, torch {torch.__version__}, {settings}"


def report(info: str, table: str, rows: List[dict], json_path: Optional[str]) -> None:
    """Print the header and the table; also write {"info", "rows"} to ``json_path`` when one is given."""
    print(info)
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
