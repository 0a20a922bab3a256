"""Write a Comparison: per_class.csv, other_metrics.csv, comparison.json, index.html with one PNG per label.

Every file is written with nnunetv2_mamba.io.atomic_write (a temporary file in its own folder, moved into place
with os.replace), so a reader never sees a half-written file (an interrupted run leaves the previous version or none).
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Sequence

from nnunetv2_mamba.compare.comparison import Comparison
from nnunetv2_mamba.io import atomic_write

PER_CLASS_COLUMNS = ("trainer", "label", "name", "mean_dice", "sd_dice", "n_cases", "n_pairs",
                     "mean_diff_vs_baseline", "p_wilcoxon", "p_holm", "partial")
OTHER_METRIC_COLUMNS = ("trainer", "label", "name", "metric", "mean", "sd", "n_cases", "partial")
COMPUTE_NOTE = "from benchmarks/benchmark_networks.py, measured on the benchmark's own plan (not this dataset's)"
COMPUTE_COLUMNS = ("trainer", "network", "params_m", "train_ms", "train_peak_gib", "infer_ms", "note", "partial")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _csv_value(value) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Return the rows as CSV text; None/NaN become empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(column)) for column in columns])
    return buffer.getvalue()


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _number(value, digits: int = 3) -> str:
    return "" if _is_missing(value) else f"{value:.{digits}f}"


def _p_value(value) -> str:
    return "" if _is_missing(value) else (f"{value:.2e}" if value < 1e-3 else f"{value:.4f}")


def _title(comparison: Comparison) -> str:
    return (f"{comparison.dataset} {comparison.configuration} ({comparison.plans}), folds "
            f"{' '.join(map(str, comparison.folds))}, baseline {comparison.baseline}")


def format_markdown(comparison: Comparison) -> str:
    """Return the per-class Dice table (and the compute table when a benchmark was given) as Markdown."""
    lines = [f"Comparison: {_title(comparison)}"]
    if comparison.partial:
        lines.append("PARTIAL REPORT - missing: " + "; ".join(comparison.missing))
    lines += ["", "| trainer | label | name | Dice mean | SD | n | diff vs baseline | p (Wilcoxon) | p (Holm) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in comparison.per_class:
        lines.append(f"| {row['trainer']} | {row['label']} | {row['name']} | {_number(row['mean_dice'])} | "
                     f"{_number(row['sd_dice'])} | {row['n_cases']} | {_number(row['mean_diff_vs_baseline'])} | "
                     f"{_p_value(row['p_wilcoxon'])} | {_p_value(row['p_holm'])} |")
    lines += ["", "| trainer | foreground mean Dice |", "|---|---|"]
    lines += [f"| {t} | {_number(d)} |" for t, d in comparison.foreground_mean_dice.items()]
    if comparison.compute:
        lines += ["", f"Compute, {COMPUTE_NOTE} ({comparison.benchmark_info}):", "",
                  "| trainer | network | params (M) | train step (ms) | train peak (GiB) | inference (ms) | note |",
                  "|---|---|---|---|---|---|---|"]
        for row in comparison.compute:
            lines.append(f"| {row['trainer']} | {row['network']} | {_number(row['params_m'], 2)} | "
                         f"{_number(row['train_ms'], 1)} | {_number(row['train_peak_gib'], 2)} | "
                         f"{_number(row['infer_ms'], 1)} | {row['note']} |")
    return "\n".join(lines)


def plot_file_name(label: str) -> str:
    """Return the PNG name of a label key: dice_label_1.png, dice_region_1-2-3.png for "(1, 2, 3)"."""
    kind = "region" if label.startswith("(") else "label"
    return f"dice_{kind}_{re.sub(r'[^0-9A-Za-z]+', '-', label).strip('-')}.png"


def plot_label(comparison: Comparison, label: str) -> bytes:
    """Return a PNG: one box per trainer over the per-case Dice, the cases drawn on top (fixed jitter)."""
    import numpy as np
    from matplotlib.figure import Figure

    trainers = comparison.trainers
    values = [[dice[label] for dice in comparison.per_case_dice[t].values() if not math.isnan(dice[label])]
              for t in trainers]
    figure = Figure(figsize=(max(4.0, 1.3 * len(trainers) + 1.5), 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.boxplot(values, showfliers=False, widths=0.5)
    jitter = np.random.default_rng(0)
    for position, points in enumerate(values, start=1):
        axes.scatter(position + jitter.uniform(-0.12, 0.12, len(points)), points, s=12, alpha=0.6, zorder=3)
    axes.set_xticks(range(1, len(trainers) + 1), [t.replace("nnUNetTrainer", "") or "nnUNetTrainer"
                                                  for t in trainers], rotation=30, ha="right")
    name = comparison.names.get(label, "")
    axes.set_title(f"Dice, label {label}" + (f" ({name})" if name else "")
                   + (" - PARTIAL" if comparison.partial else ""))
    axes.set_ylabel("Dice per case")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _html_table(rows: Sequence[dict], columns: Sequence[str], formats: Dict[str, callable]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(formats.get(c, _csv_value)(row.get(c)))}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def format_html(comparison: Comparison, plot_files: Dict[str, str]) -> str:
    """Return the HTML page: title, partial banner, per-class table, one plot per label, compute table."""
    numbers = {c: _number for c in ("mean_dice", "sd_dice", "mean_diff_vs_baseline")}
    numbers.update(p_wilcoxon=_p_value, p_holm=_p_value)
    parts = [f"<h1>Comparison: {html.escape(_title(comparison))}</h1>"]
    if comparison.partial:
        parts.append("<p class='partial'><b>PARTIAL REPORT</b> - missing: "
                     + "; ".join(html.escape(m) for m in comparison.missing) + "</p>")
    parts += ["<h2>Dice per class</h2>", _html_table(comparison.per_class, PER_CLASS_COLUMNS, numbers),
              "<p>Cases pooled over the folds (each case from the fold that validated it). p_wilcoxon: "
              "scipy.stats.wilcoxon on the per-case Dice paired with the baseline; p_holm: Holm correction over "
              "all tests of this report.</p>", "<h2>Per-case Dice</h2>"]
    for label in comparison.labels:
        parts.append(f"<figure><img src='{html.escape(plot_files[label])}' alt='Dice, label "
                     f"{html.escape(label)}'><figcaption>label {html.escape(label)} "
                     f"{html.escape(comparison.names.get(label, ''))}</figcaption></figure>")
    if comparison.compute:
        parts += [f"<h2>Compute</h2><p>{html.escape(COMPUTE_NOTE)}: {html.escape(comparison.benchmark_info)}</p>",
                  _html_table(comparison.compute, COMPUTE_COLUMNS, {})]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:2px 6px}.partial{color:#b00}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(_title(comparison))}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_outputs(comparison: Comparison, output_folder) -> List[Path]:
    """Write every output file into ``output_folder`` (created if needed); return their paths."""
    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, data) -> None:
        atomic_write(folder / name, data)
        written.append(folder / name)

    put("per_class.csv", to_csv(comparison.per_class, PER_CLASS_COLUMNS))
    put("other_metrics.csv", to_csv(comparison.other_metrics, OTHER_METRIC_COLUMNS))
    if comparison.compute:
        put("compute.csv", to_csv(comparison.compute, COMPUTE_COLUMNS))
    put("comparison.json", json.dumps(_json_safe(comparison.to_dict()), indent=2) + "\n")
    plot_files = {label: plot_file_name(label) for label in comparison.labels}
    for label, name in plot_files.items():
        put(name, plot_label(comparison, label))
    put("index.html", format_html(comparison, plot_files))
    return written
