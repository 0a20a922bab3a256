"""Build the comparison: per trainer and label, Dice over the pooled cases, paired tests against the baseline."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunetv2_mamba.compare.results import (CompareError, TrainerResults, find_dataset_folder, label_names,
                                            label_sort_key, load_trainer, read_dataset_json, results_root,
                                            trainer_folder_name)
from nnunetv2_mamba.compare.stats import holm, mean_sd, paired_wilcoxon

DEFAULT_FOLDS = (0, 1, 2, 3, 4)
TRAINER_PREFIX = "nnUNetTrainer"
BASELINE_NETWORK = "PlainConvUNet"  # the benchmark's name for nnU-Net's default network
_SHOWN_CASES = 5


@dataclass
class Comparison:
    """Everything the outputs show; ``partial`` is True when something asked for was missing."""

    dataset: str
    configuration: str
    plans: str
    folds: List[int]
    baseline: str
    trainers: List[str]
    labels: List[str]
    names: Dict[str, str]
    per_class: List[dict]
    other_metrics: List[dict]
    per_case_dice: Dict[str, Dict[str, Dict[str, float]]]  # trainer -> case -> label -> Dice
    fold_of_case: Dict[str, Dict[str, int]]  # trainer -> case -> fold
    foreground_mean_dice: Dict[str, float]
    missing: List[str] = field(default_factory=list)
    compute: List[dict] = field(default_factory=list)
    benchmark_info: str = ""

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "folds": self.folds, "baseline": self.baseline, "trainers": self.trainers,
                "partial": self.partial, "missing": self.missing,
                "labels": [{"label": key, "name": self.names.get(key, "")} for key in self.labels],
                "per_class": self.per_class, "other_metrics": self.other_metrics,
                "foreground_mean_dice": self.foreground_mean_dice,
                "compute": self.compute, "benchmark_info": self.benchmark_info,
                "fold_of_case": self.fold_of_case, "per_case_dice": self.per_case_dice}


def _listing(cases: Sequence[str]) -> str:
    shown = ", ".join(sorted(cases)[:_SHOWN_CASES])
    return shown + (f" and {len(cases) - _SHOWN_CASES} more" if len(cases) > _SHOWN_CASES else "")


def _dice(results: TrainerResults, label: str, cases: Sequence[str]) -> List[float]:
    return [results.cases[case][label]["Dice"] for case in cases]


def _paired_mean_difference(values: Sequence[float], baseline: Sequence[float]) -> float:
    differences = [v - b for v, b in zip(values, baseline) if not math.isnan(v) and not math.isnan(b)]
    return sum(differences) / len(differences) if differences else float("nan")


def build_comparison(dataset: str, configuration: str, trainers: Sequence[str], baseline: Optional[str] = None,
                     plans: str = "nnUNetPlans", folds: Sequence[int] = DEFAULT_FOLDS,
                     allow_partial: bool = False, results_folder: Optional[str] = None,
                     benchmark_json: Optional[str] = None) -> Comparison:
    """Read every trainer's fold summaries and return the comparison against ``baseline`` (default: the first).

    Missing folds or cases raise ``CompareError`` naming them, unless ``allow_partial``: then what exists is
    used and ``Comparison.missing`` says what was not there. A trainer that is not there at all always raises
    (a misspelled name must not disappear from a report), as do labels that differ between trainers.
    """
    trainers = list(dict.fromkeys(trainers))
    if not trainers:
        raise CompareError("No trainer given: pass one or more with -tr")
    folds = list(dict.fromkeys(folds))
    if not folds:
        raise CompareError("No fold given: pass -f 0 1 2 3 4 (or a subset)")
    if any(fold < 0 for fold in folds):
        raise CompareError(f"Folds must be non-negative integers (got {folds})")
    baseline = baseline or trainers[0]
    if baseline not in trainers:
        trainers.insert(0, baseline)
    dataset_folder = find_dataset_folder(results_root(results_folder), str(dataset))
    folders = [dataset_folder / trainer_folder_name(t, plans, configuration) for t in trainers]
    dataset_json = read_dataset_json(dataset_folder, folders)
    file_ending = dataset_json.get("file_ending", "")
    loaded = {t: load_trainer(dataset_folder, t, plans, configuration, folds, file_ending) for t in trainers}

    missing = [message for results in loaded.values() for message in results.missing]
    if missing and not allow_partial:
        raise CompareError("; ".join(missing) + " (or pass --allow-partial to report what exists)")
    if not loaded[baseline].cases:
        raise CompareError(f"The baseline {baseline} has no validation results in folds {folds}")
    for trainer, results in list(loaded.items()):
        if not results.cases:
            del loaded[trainer]  # recorded in `missing` already (every fold is missing)
    trainers = [t for t in trainers if t in loaded]

    labels = sorted(loaded[baseline].labels, key=label_sort_key)
    for trainer, results in loaded.items():
        if sorted(results.labels, key=label_sort_key) != labels:
            raise CompareError(f"{trainer} reports labels {sorted(results.labels, key=label_sort_key)} but "
                               f"{baseline} reports {labels}: the trainers were not evaluated on the same "
                               "labels/regions (compare runs of one dataset.json)")
    all_cases = set().union(*(results.cases for results in loaded.values()))
    case_problems = []
    for trainer, results in loaded.items():
        lacking = all_cases - set(results.cases)
        if lacking:
            case_problems.append(f"{trainer} has no result for {len(lacking)} case(s) that other trainers have: "
                                 f"{_listing(list(lacking))}")
    if case_problems and not allow_partial:
        raise CompareError("; ".join(case_problems) + " (check the folds/splits, or pass --allow-partial)")
    missing += case_problems

    names = label_names(dataset_json)
    per_class, other_metrics = [], []
    base = loaded[baseline]
    for trainer in trainers:
        results = loaded[trainer]
        own_cases = sorted(results.cases)
        paired_cases = sorted(set(results.cases) & set(base.cases))
        for label in labels:
            mean, sd, n = mean_sd(_dice(results, label, own_cases))
            row = {"trainer": trainer, "label": label, "name": names.get(label, ""), "mean_dice": mean,
                   "sd_dice": sd, "n_cases": n, "n_pairs": None, "mean_diff_vs_baseline": None,
                   "p_wilcoxon": None, "p_holm": None, "partial": bool(missing)}
            if trainer != baseline:
                values, reference = _dice(results, label, paired_cases), _dice(base, label, paired_cases)
                row["p_wilcoxon"], row["n_pairs"] = paired_wilcoxon(values, reference)
                row["mean_diff_vs_baseline"] = _paired_mean_difference(values, reference)
            per_class.append(row)
            metrics = [m for m in results.cases[own_cases[0]][label] if m != "Dice"]
            for metric in metrics:
                m_mean, m_sd, m_n = mean_sd([results.cases[case][label][metric] for case in own_cases])
                other_metrics.append({"trainer": trainer, "label": label, "name": names.get(label, ""),
                                      "metric": metric, "mean": m_mean, "sd": m_sd, "n_cases": m_n,
                                      "partial": bool(missing)})
    tested = [row for row in per_class if row["trainer"] != baseline]
    for row, adjusted in zip(tested, holm([row["p_wilcoxon"] for row in tested])):
        row["p_holm"] = adjusted

    foreground = {}
    for trainer in trainers:
        class_means = [row["mean_dice"] for row in per_class if row["trainer"] == trainer and row["label"] != "0"]
        foreground[trainer] = sum(class_means) / len(class_means) if class_means else float("nan")
    comparison = Comparison(
        dataset=dataset_folder.name, configuration=configuration, plans=plans, folds=folds, baseline=baseline,
        trainers=trainers, labels=labels, names=names, per_class=per_class, other_metrics=other_metrics,
        per_case_dice={t: {case: {label: m[label]["Dice"] for label in labels}
                           for case, m in sorted(loaded[t].cases.items())} for t in trainers},
        fold_of_case={t: dict(sorted(loaded[t].fold_of_case.items())) for t in trainers},
        foreground_mean_dice=foreground, missing=missing)
    if benchmark_json:
        comparison.benchmark_info, comparison.compute = read_benchmark(benchmark_json, trainers)
        for row in comparison.compute:
            row["partial"] = bool(missing)
    return comparison


def benchmark_network_for(trainer: str, networks: Sequence[str]) -> Optional[str]:
    """Return the benchmark's network for a trainer name, or None.

    nnUNetTrainer and its nnU-Net variants (``nnUNetTrainer_250epochs``, ...) train PlainConvUNet; our trainers
    are ``nnUNetTrainer<Network><recipe suffix>``: the longest benchmark network name that starts the rest
    (``SegMambaSkipPeriodicLR`` -> ``SegMambaSkip``, ``UMambaBotNoAMP`` -> ``UMambaBot``).
    """
    if not trainer.startswith(TRAINER_PREFIX):
        return trainer if trainer in networks else None
    rest = trainer[len(TRAINER_PREFIX):]
    if rest == "" or rest.startswith("_"):
        return BASELINE_NETWORK if BASELINE_NETWORK in networks else None
    matches = [network for network in networks if rest.startswith(network)]
    return max(matches, key=len) if matches else None


def read_benchmark(path: str, trainers: Sequence[str]):
    """Return (info line, rows) of benchmarks/benchmark_networks.py's --json file for the trainers."""
    try:
        benchmark = json.loads(Path(path).read_text())
        rows = {row["network"]: row for row in benchmark["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompareError(f"--benchmark-json {path} is not a benchmarks/benchmark_networks.py --json file "
                           f"({type(error).__name__}: {error})") from None
    compute = []
    for trainer in trainers:
        network = benchmark_network_for(trainer, list(rows))
        row = rows.get(network, {}) if network else {}
        compute.append({"trainer": trainer, "network": network or "", "params_m": row.get("params_m"),
                        "train_ms": row.get("train_ms"), "train_peak_gib": row.get("train_peak_gib"),
                        "infer_ms": row.get("infer_ms"),
                        "note": row.get("error", "" if network else "not in the benchmark JSON")})
    return benchmark.get("info", ""), compute
