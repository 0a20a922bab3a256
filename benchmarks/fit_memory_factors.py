"""Fit the per-family memory factors of nnunetv2_mamba/planning/memory.py to measured GPU peaks (CPU only).

Reads the lines ``NAME (patch) estimate X GiB measured Y GiB ...`` that ``calibrate_memory.py`` prints (one log
per topology), recomputes on the CPU the state and the fp32 saved bytes of every measured point, and chooses per
family the factor that minimises the largest relative error over its points (the estimate is
``state + factor * activations``, so the error is monotone in the factor and the minimax factor balances the
largest over- and under-estimate). Prints one row per family: points, factor, worst error before/after.

    python benchmarks/fit_memory_factors.py isotropic=benchmarks/results/2026-12-02-h200/calibration_isotropic.log \
        anisotropic=benchmarks/results/2026-12-02-h200/calibration_anisotropic.log --json factors.json

A log given as ``nnunet=path`` holds instead the ``finished TRAINER BUDGET GB: {record}`` lines of
tests/nnunetv2_mamba/planning/test_plan_gpu.py: real ``nnUNetv2_train`` steps at the patch and batch the planner chose
(nnU-Net's loss, data augmentation and deep supervision), with the planner's estimate in the record. Their factor-1
activations are the record's activations over the factor it was planned with (no CPU probe needed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_networks import benchmark_plan  # noqa: E402
from calibrate_memory import FAMILY_OF_BENCHMARK, estimator  # noqa: E402

from nnunetv2_mamba.planning import memory  # noqa: E402

LINE = re.compile(r"^(\w+)\s+\(([\d, ]+)\)\s+estimate\s+([\d.]+) GiB\s+measured\s+([\d.]+) GiB")


def read_points(topology: str, log: Path) -> list:
    """Return [(network, topology, patch, measured GiB)] from one calibrate_memory.py log."""
    points = []
    for line in log.read_text().splitlines():
        match = LINE.match(line.strip())
        if match:
            patch = tuple(int(v) for v in match.group(2).split(","))
            points.append((match.group(1), topology, patch, float(match.group(4))))
    return points


MEMCHECK_LINE = re.compile(r"finished (\w+) ([\d.]+) GB: (\{.*\})\s*$")


def read_memcheck_rows(log: Path) -> list:
    """Return fit rows from test_plan_gpu.py's ``finished ...`` lines (one per trainer and budget).

    Records written before estimates carried their factor need ``planned_factors.json`` beside the log: the
    factors of the commit that planned them (today's table may differ)."""
    planned = log.parent / "planned_factors.json"
    planned_factors = json.loads(planned.read_text())["factors"] if planned.exists() else {}
    rows = []
    for line in log.read_text().splitlines():
        match = MEMCHECK_LINE.search(line)
        if not match:
            continue
        record = json.loads(match.group(3))
        estimate = record["estimate"]
        factor = estimate.get("factor") or planned_factors.get(estimate["family"])
        if not factor:
            raise SystemExit(f"{log}: the record of {match.group(1)} has no 'factor' and {planned} does not give "
                             f"one for {estimate['family']!r}; write the factors its plans were made with there.")
        rows.append({"network": match.group(1), "family": estimate["family"], "topology": "nnunet",
                     "patch_size": record["patch_size"], "batch": record["batch_size"],
                     "measured_gib": record["peak_allocated_gib"], "state_gib": estimate["state_gib"],
                     "activation_gib_factor_1": estimate["activation_gib"] / factor})
    return rows


def unit_estimates(points: list, batch: int) -> list:
    """Return rows with the state and the factor-1 activation bytes of every point (probes on the CPU)."""
    rows = []
    estimators = {}
    for name, topology, patch, measured in points:
        os.environ["NNUNETV2_MAMBA_BENCH_TOPOLOGY"] = topology
        key = (name, topology)
        if key not in estimators:
            estimators[key] = estimator(name)
        family = FAMILY_OF_BENCHMARK[name]
        unit = memory.estimate_from_probe(family, estimators[key].probe(benchmark_plan(patch)), patch, batch, factor=1.0)
        rows.append({"network": name, "family": family, "topology": topology, "patch_size": list(patch),
                     "measured_gib": measured, "state_gib": unit.state_bytes / memory.GIB,
                     "activation_gib_factor_1": unit.activation_bytes / memory.GIB})
    return rows


def worst_error(rows: list, factor: float) -> float:
    return max(abs((r["state_gib"] + factor * r["activation_gib_factor_1"]) / r["measured_gib"] - 1) for r in rows)


def minimax_factor(rows: list) -> float:
    """Return the factor minimising the largest relative error (bisection on the balance of the extremes)."""
    low, high = 0.0, 4.0
    for _ in range(60):
        middle = (low + high) / 2
        errors = [(r["state_gib"] + middle * r["activation_gib_factor_1"]) / r["measured_gib"] - 1 for r in rows]
        if max(errors) + min(errors) > 0:  # over-estimates dominate: a smaller factor
            high = middle
        else:
            low = middle
    return round((low + high) / 2, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="TOPOLOGY=path/to/calibration.log")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", help="write the factors and rows here")
    args = parser.parse_args(argv)
    points, memcheck_rows = [], []
    for item in args.logs:
        topology, _, path = item.partition("=")
        if topology == "nnunet":
            memcheck_rows += read_memcheck_rows(Path(path))
        else:
            points += read_points(topology, Path(path))
    rows = unit_estimates(points, args.batch) + memcheck_rows
    by_family = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(row)
    factors = {}
    print(f"{'family':<22} {'points':>6} {'old factor':>10} {'old worst':>9} {'new factor':>10} {'new worst':>9}")
    for family, family_rows in by_family.items():
        factors[family] = minimax_factor(family_rows)
        old = memory.calibration_factor(family)
        print(f"{family:<22} {len(family_rows):>6} {old:>10.4f} {100 * worst_error(family_rows, old):>8.1f}% "
              f"{factors[family]:>10.4f} {100 * worst_error(family_rows, factors[family]):>8.1f}%")
        for row in family_rows:
            row["fitted_error_pct"] = round(100 * ((row["state_gib"] + factors[family] * row["activation_gib_factor_1"])
                                                   / row["measured_gib"] - 1), 1)
    print("\n| family | topology | patch | batch | measured (GiB) | estimate (GiB) | error |\n|---|---|---|---|---|---|---|")
    for family, family_rows in by_family.items():
        for row in family_rows:
            estimate = row["state_gib"] + factors[family] * row["activation_gib_factor_1"]
            print(f"| {family} | {row['topology']} | {'x'.join(map(str, row['patch_size']))} | "
                  f"{row.get('batch', args.batch)} | {row['measured_gib']:.2f} | {estimate:.2f} | "
                  f"{row['fitted_error_pct']:+.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"factors": factors, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
