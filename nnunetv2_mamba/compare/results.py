"""Read nnU-Net's cross-validation results: one trainer's ``fold_*/validation/summary.json``, pooled by case.

nnU-Net writes ``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION/fold_K/validation/summary.json``
(nnunetv2/evaluation/evaluate_predictions.py): ``metric_per_case`` is a list of ``{"prediction_file",
"reference_file", "metrics": {label key: {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"}}}``, the
label key being ``str(label)`` or, for region-based training, ``str(tuple(region))`` (e.g. ``"(1, 2, 3)"``);
``mean`` and ``foreground_mean`` hold the averages. Every case is validated by exactly one fold, so pooling
the folds gives each training case once.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence


class CompareError(ValueError):
    """Bad input or missing results; the message says what and how to fix it (the CLI prints it, exit 2)."""


# case id -> label key -> metric name -> value (NaN where nnU-Net wrote NaN: empty reference and prediction)
CaseMetrics = Dict[str, Dict[str, Dict[str, float]]]


@dataclass
class TrainerResults:
    """One trainer's validation metrics pooled over the folds that were found."""

    trainer: str
    folder: Path
    cases: CaseMetrics = field(default_factory=dict)
    fold_of_case: Dict[str, int] = field(default_factory=dict)
    folds_found: List[int] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # what was asked for but is not there

    @property
    def labels(self) -> List[str]:
        """Return the label keys of the first case (every case of a summary has the same keys)."""
        return list(next(iter(self.cases.values()))) if self.cases else []


def results_root(results_folder: Optional[str] = None) -> Path:
    """Return the nnUNet_results folder (the argument, else $nnUNet_results)."""
    root = results_folder or os.environ.get("nnUNet_results")
    if not root:
        raise CompareError("nnUNet_results is not set: export nnUNet_results=/path/to/nnUNet_results "
                           "or pass --results-folder")
    if not os.path.isdir(root):
        raise CompareError(f"The results folder {root} does not exist: check $nnUNet_results / --results-folder")
    return Path(root)


def find_dataset_folder(root: Path, dataset: str) -> Path:
    """Return root/DatasetXXX_Name for a dataset id ('4', '004') or full name ('Dataset004_Hippocampus')."""
    if dataset.startswith("Dataset"):
        folder = root / dataset
        if folder.is_dir():
            return folder
        candidates = []
    else:
        try:
            dataset_id = int(dataset)
        except ValueError:
            raise CompareError(f"-d {dataset!r} is neither a dataset id (e.g. 4) nor a name "
                               "(e.g. Dataset004_Hippocampus)") from None
        candidates = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise CompareError(f"Dataset id {dataset} matches several folders in {root}: "
                               f"{', '.join(p.name for p in candidates)}; pass the full name with -d")
    present = sorted(p.name for p in root.glob("Dataset*") if p.is_dir())
    raise CompareError(f"No results for dataset {dataset} in {root} (present: {', '.join(present) or 'none'})")


def trainer_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """Return nnU-Net's output folder name TRAINER__PLANS__CONFIGURATION."""
    return f"{trainer}__{plans}__{configuration}"


def _missing_trainer_message(dataset_folder: Path, trainer: str, plans: str, configuration: str) -> str:
    folders = [p.name.split("__") for p in dataset_folder.iterdir() if p.is_dir() and p.name.count("__") == 2]
    same_setting = sorted(t for t, p, c in folders if p == plans and c == configuration)
    message = (f"No results for trainer {trainer} ({trainer_folder_name(trainer, plans, configuration)} is not in "
               f"{dataset_folder})")
    other_settings = sorted(f"{p} {c}" for t, p, c in folders if t == trainer)
    if other_settings:
        return message + f"; it was trained with plans/configuration {', '.join(other_settings)} (use -p / -c)"
    close = difflib.get_close_matches(trainer, same_setting, n=1)
    if close:
        return message + f"; did you mean {close[0]}?"
    return message + f"; trainers with {plans} {configuration}: {', '.join(same_setting) or 'none'}"


def case_id(entry: dict, file_ending: str) -> str:
    """Return the case identifier of a metric_per_case entry: the reference file's name without its ending."""
    name = os.path.basename(entry["reference_file"])
    if file_ending and name.endswith(file_ending):
        return name[:-len(file_ending)]
    return name.split(".")[0]


def _as_float(value) -> float:
    return float("nan") if value is None else float(value)


def read_summary(path: Path, file_ending: str) -> CaseMetrics:
    """Return {case: {label key: {metric: value}}} of one summary.json."""
    try:
        summary = json.loads(path.read_text())
        cases: CaseMetrics = {}
        for entry in summary["metric_per_case"]:
            cases[case_id(entry, file_ending)] = {
                label: {metric: _as_float(value) for metric, value in metrics.items()}
                for label, metrics in entry["metrics"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompareError(f"{path} is not a readable nnU-Net summary.json ({type(error).__name__}: {error}); "
                           "re-run the validation with `nnUNetv2_train ... --val`") from None
    for case, labels in cases.items():
        if any("Dice" not in metrics for metrics in labels.values()):
            raise CompareError(f"{path}: case {case} has no Dice value; re-run the validation")
    return cases


def load_trainer(dataset_folder: Path, trainer: str, plans: str, configuration: str, folds: Sequence[int],
                 file_ending: str) -> TrainerResults:
    """Pool one trainer's fold summaries; a missing trainer raises, missing folds are recorded in ``missing``."""
    folder = dataset_folder / trainer_folder_name(trainer, plans, configuration)
    if not folder.is_dir():
        raise CompareError(_missing_trainer_message(dataset_folder, trainer, plans, configuration))
    results = TrainerResults(trainer, folder)
    for fold in folds:
        summary = folder / f"fold_{fold}" / "validation" / "summary.json"
        if not summary.is_file():
            results.missing.append(f"{trainer} fold {fold}: {summary} is missing (train it with `nnUNetv2_train "
                                   f"{dataset_folder.name} {configuration} {fold} -tr {trainer} -p {plans}`, or "
                                   "add --val if training finished)")
            continue
        for case, metrics in read_summary(summary, file_ending).items():
            if case in results.cases:
                raise CompareError(f"{trainer}: case {case} is validated by fold {results.fold_of_case[case]} and "
                                   f"fold {fold}; the folds must not overlap (each case once)")
            results.cases[case] = metrics
            results.fold_of_case[case] = fold
        results.folds_found.append(fold)
    return results


def read_dataset_json(dataset_folder: Path, trainer_folders: Sequence[Path]) -> dict:
    """Return dataset.json: the copy nnU-Net keeps in a trainer folder, else $nnUNet_raw's or
    $nnUNet_preprocessed's; {} when none exists (names are then left empty)."""
    candidates = [folder / "dataset.json" for folder in trainer_folders]
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]) / dataset_folder.name / "dataset.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError as error:
                raise CompareError(f"{candidate} is not valid JSON ({error})") from None
    return {}


def label_names(dataset_json: dict) -> Dict[str, str]:
    """Return {nnU-Net summary key: name} from dataset.json ``labels`` (regions as ``str(tuple(region))``)."""
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        key = str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
        names[key] = name
    return names


def label_sort_key(key: str):
    """Order labels as nnU-Net lists them: integers numerically, regions after them by their members."""
    stripped = key.strip("()").replace(" ", "")
    try:
        members = tuple(int(part) for part in stripped.split(",") if part)
    except ValueError:
        return (2, (), key)
    return (0 if key.lstrip("-").isdigit() else 1, members, key)
