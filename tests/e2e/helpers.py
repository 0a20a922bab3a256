"""Run nnU-Net's own commands (plan/preprocess, train, predict, evaluate) on a tiny dataset, on the CPU.

Usage in a test::

    from tests.e2e.helpers import run_nnunet_pipeline
    result = run_nnunet_pipeline(tmp_path, "nnUNetTrainerUMambaEnc", configuration="3d_fullres")
    assert result["summary"]["foreground_mean"]["Dice"] >= 0.0

``make_dataset(raw_root: Path, dataset_id: int) -> Path`` may replace the synthetic dataset; it must write
Dataset{id:03d}_<name>/ with imagesTr, labelsTr, dataset.json, imagesTs and labelsTs (ground truth of the
test images) and return that folder. Training uses ``<trainer>_tiny`` from tests/e2e/trainers (1 epoch x 2
iterations). Every command's output goes to ``<tmp_path>/logs/<step>.log``; a failing step raises with the
log's tail in the message.

Planning and preprocessing take about a minute on two cores, so each dataset is planned once per test session
(in a shared folder) and each configuration preprocessed once; every test still trains, predicts and
evaluates into its own ``tmp_path``.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from nnunetv2_mamba.data.synthetic import make_synthetic_dataset

TEST_TRAINER_DIR = Path(__file__).resolve().parent / "trainers"


_SESSION_ROOT: Optional[Path] = None
_PREPARED: dict = {}  # (dataset_id, dataset maker, shape) -> (dataset folder, set of preprocessed configurations)


def _session_root() -> Path:
    global _SESSION_ROOT
    if _SESSION_ROOT is None:
        _SESSION_ROOT = Path(tempfile.mkdtemp(prefix="nnunetv2_mamba_e2e_"))
        atexit.register(shutil.rmtree, _SESSION_ROOT, True)
    return _SESSION_ROOT


def nnunet_env(tmp_path: Path, shared_root: Optional[Path] = None) -> dict:
    """Return an environment with nnU-Net's folders (raw/preprocessed under shared_root, results under
    tmp_path) and the test trainers on the lookup path."""
    env = dict(os.environ)
    shared_root = Path(tmp_path) if shared_root is None else shared_root
    for variable, root in (("nnUNet_raw", shared_root), ("nnUNet_preprocessed", shared_root),
                           ("nnUNet_results", Path(tmp_path))):
        env[variable] = str(root / variable)
        Path(env[variable]).mkdir(parents=True, exist_ok=True)
    # Only the test folder is given: the plugin's start-up hook must append its own folder itself.
    env["nnUNet_extTrainer"] = str(TEST_TRAINER_DIR)
    env["nnUNet_n_proc_DA"] = "1"  # planning needs >= 1; training is set to 0 (single-threaded) below
    env["nnUNet_compile"] = "f"
    env["nnUNet_def_n_proc"] = "1"  # nnU-Net's export pools default to 8 processes: too many for 2 cores
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def nnunet_command(name: str) -> str:
    """Return the path of an nnU-Net console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_step(step: str, args: Sequence[str], env: dict, log_dir: Path, timeout: int = 900) -> str:
    """Run one command, save its output to log_dir/step.log, raise with the tail of the log if it fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    completed = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)
    output = completed.stdout + completed.stderr + f"\n[{step} took {time.perf_counter() - started:.1f} s]\n"
    (log_dir / f"{step}.log").write_text(output)
    if completed.returncode != 0:
        raise AssertionError(f"{step} failed (exit {completed.returncode}): {' '.join(args)}\n{output[-4000:]}")
    return output


def run_nnunet_pipeline(tmp_path: Path, trainer_name: str, configuration: str = "3d_fullres", dim: int = 3,
                        dataset_id: int = 990, make_dataset: Optional[Callable[[Path, int], Path]] = None,
                        shape: Optional[Sequence[int]] = None) -> dict:
    """Run plan/preprocess, train ``<trainer>_tiny`` fold 0, predict imagesTs and evaluate; return paths and summary."""
    tmp_path = Path(tmp_path)
    env = nnunet_env(tmp_path, _session_root())
    raw_root = Path(env["nnUNet_raw"])
    logs = tmp_path / "logs"
    key = (dataset_id, make_dataset, tuple(shape) if shape else dim)
    if key not in _PREPARED:
        if any(prepared_key[0] == dataset_id for prepared_key in _PREPARED):
            raise ValueError(f"dataset_id {dataset_id} is already used by another dataset in this session; "
                             "pass a different dataset_id.")
        if make_dataset is None:
            default_shape = (32, 32, 32) if dim == 3 else (64, 64)
            dataset_dir = make_synthetic_dataset(raw_root, dataset_id, shape=shape or default_shape)
        else:
            dataset_dir = Path(make_dataset(raw_root, dataset_id))
        run_step("plan_and_preprocess", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                                         "-c", configuration, "-np", "1", "--verify_dataset_integrity"], env, logs)
        _PREPARED[key] = (dataset_dir, {configuration})
    dataset_dir, preprocessed = _PREPARED[key]
    if configuration not in preprocessed:
        run_step("preprocess", [nnunet_command("nnUNetv2_preprocess"), "-d", str(dataset_id), "-c",
                                configuration, "-np", "1"], env, logs)
        preprocessed.add(configuration)
    tiny = f"{trainer_name}_tiny"
    # nnUNet_n_proc_DA=0: single-threaded augmentation, no worker processes on a 2-core CI machine.
    run_step("train", [nnunet_command("nnUNetv2_train"), str(dataset_id), configuration, "0", "-tr", tiny,
                       "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"}, logs)
    predictions = tmp_path / "predictions"
    run_step("predict", [nnunet_command("nnUNetv2_predict"), "-i", str(dataset_dir / "imagesTs"), "-o",
                         str(predictions), "-d", str(dataset_id), "-c", configuration, "-f", "0", "-tr", tiny,
                         "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env, logs)
    labels = sorted(v for v in json.loads((dataset_dir / "dataset.json").read_text())["labels"].values()
                    if isinstance(v, int) and v > 0)
    run_step("evaluate", [nnunet_command("nnUNetv2_evaluate_simple"), str(dataset_dir / "labelsTs"),
                          str(predictions), "-l", *map(str, labels), "-np", "1"], env, logs)
    results_dir = next(Path(env["nnUNet_results"]).glob(f"Dataset{dataset_id:03d}_*")) / \
        f"{tiny}__nnUNetPlans__{configuration}"
    return {"results_dir": results_dir, "predictions_dir": predictions, "dataset_dir": dataset_dir,
            "summary": json.loads((predictions / "summary.json").read_text()), "env": env}
