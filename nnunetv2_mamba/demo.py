"""The quick-start job: synthetic dataset -> plan/preprocess -> short training -> prediction -> evaluation.

Everything runs in-process through nnU-Net's own Python API (the same code as its commands), inside one
work folder, so it needs no environment variables and leaves nothing elsewhere.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger(__name__)

DEFAULT_TRAINER = "nnUNetTrainerUMambaBot"


@dataclass
class DemoResult:
    """What the demo produced: folders, timings (seconds per step) and nnU-Net's evaluation summary."""

    workdir: Path
    results_dir: Path
    predictions_dir: Path
    timings: Dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def _configure_nnunet_environment(workdir: Path) -> None:
    """Point nnU-Net at folders inside workdir and size its worker pools for this machine."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[variable] = str(workdir / variable)
        (workdir / variable).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    # nnU-Net reads these when its modules are imported: set them before the first nnunetv2 import.
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(4, cpus // 2))))
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, min(8, cpus - 1))))


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible; use --device cpu.")
    return torch.device(device)


def run_demo(workdir: os.PathLike, trainer_name: str = DEFAULT_TRAINER, configuration: str = "3d_fullres",
             epochs: int = 1, iterations: int = 10, device: str = "auto", dataset_id: int = 987,
             shape=(32, 32, 32)) -> DemoResult:
    """Run the quick-start job in ``workdir`` and return its result; reuses data already prepared there."""
    if epochs < 1 or iterations < 1:
        raise ValueError(f"epochs and iterations must be >= 1; got epochs={epochs}, iterations={iterations}.")
    workdir = Path(workdir).resolve()
    _configure_nnunet_environment(workdir)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_mamba.data.synthetic import LABELS, make_synthetic_dataset

    torch_device = _resolve_device(device)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)  # the lookup nnUNetv2_train uses
    timings: Dict[str, float] = {}
    raw_root = workdir / "nnUNet_raw"
    existing = sorted(raw_root.glob(f"Dataset{dataset_id:03d}_*"))
    started = time.perf_counter()
    dataset_dir = existing[0] if existing else make_synthetic_dataset(raw_root, dataset_id, shape=shape)
    timings["dataset"] = time.perf_counter() - started

    started = time.perf_counter()
    preprocessed = workdir / "nnUNet_preprocessed" / dataset_dir.name
    if not (preprocessed / "nnUNetPlans.json").exists():
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
        plan_experiments([dataset_id])
    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    if configuration not in plans["configurations"]:
        raise ValueError(f"Configuration {configuration!r} is not in the plans; available: "
                         f"{sorted(plans['configurations'])}.")
    if not (preprocessed / plans["configurations"][configuration].get("data_identifier",
                                                                      f"nnUNetPlans_{configuration}")).exists():
        preprocess([dataset_id], configurations=(configuration,), num_processes=(1,))
    timings["plan_and_preprocess"] = time.perf_counter() - started

    started = time.perf_counter()
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    plans["continue_training"] = False  # nnU-Net 2.8's run_training sets this key; the trainer pops it
    trainer = trainer_class(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json,
                            device=torch_device)
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(1, iterations // 5)
    trainer.run_training()
    timings["train"] = time.perf_counter() - started
    started = time.perf_counter()
    trainer.perform_actual_validation()
    timings["validate"] = time.perf_counter() - started
    results_dir = Path(trainer.output_folder).parent

    started = time.perf_counter()
    predictions = workdir / "predictions"
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results_dir), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files(str(dataset_dir / "imagesTs"), str(predictions), save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    timings["predict"] = time.perf_counter() - started
    started = time.perf_counter()
    labels = sorted(value for value in LABELS.values() if value > 0)
    compute_metrics_on_folder_simple(str(dataset_dir / "labelsTs"), str(predictions), labels, num_processes=1)
    timings["evaluate"] = time.perf_counter() - started
    summary = load_json(str(predictions / "summary.json"))
    return DemoResult(workdir=workdir, results_dir=results_dir, predictions_dir=predictions, timings=timings,
                      summary=summary)
