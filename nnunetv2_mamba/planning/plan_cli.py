"""``nnunetv2_mamba plan``: nnU-Net plans whose patch and batch fit the GPU memory with a plugin trainer."""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from typing import List, Optional, Sequence

logger = logging.getLogger(__name__)

DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres")
CONFIGURATION_DIMS = {"2d": 2, "3d_fullres": 3, "3d_lowres": 3}


def find_trainer(name: str):
    """Return the plugin trainer class called ``name``; a misspelling names the closest trainers."""
    from nnunetv2_mamba.trainers.discovery import concrete_trainers

    trainers = dict(concrete_trainers())
    if name in trainers:
        return trainers[name]
    close = difflib.get_close_matches(name, list(trainers), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`nnunetv2_mamba list` shows them."
    raise ValueError(f"Unknown trainer {name!r}; {hint}")


def default_plans_name(trainer_class, gpu_memory_gb: float) -> str:
    """Return e.g. ``nnUNetPlans_UMambaEnc_24G`` (family without punctuation, budget in GB)."""
    family = re.sub(r"[^0-9A-Za-z]", "", trainer_class.network_family.split("(")[0]) or trainer_class.__name__
    if trainer_class.__name__.endswith("NoAMP"):
        family += "NoAMP"
    return f"nnUNetPlans_{family}_{gpu_memory_gb:g}G".replace(".", "p")


def _dataset_id(dataset_name: str) -> int:
    return int(dataset_name[len("Dataset"):len("Dataset") + 3])


def _ensure_fingerprint(dataset_name: str) -> None:
    from nnunetv2.paths import nnUNet_preprocessed

    if os.path.isfile(os.path.join(nnUNet_preprocessed, dataset_name, "dataset_fingerprint.json")):
        return
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints

    logger.warning("No dataset fingerprint for %s yet; extracting it (nnUNetv2_extract_fingerprint).",
                   dataset_name)
    extract_fingerprints([_dataset_id(dataset_name)], num_processes=max(1, min(4, os.cpu_count() or 1)),
                         check_dataset_integrity=True, verbose=False, show_progress_bar=False)


def plan_for_gpu(dataset: str, trainer_name: str, gpu_memory_gb: float,
                 configurations: Optional[Sequence[str]] = None, plans_name: Optional[str] = None) -> dict:
    """Plan ``dataset`` for ``trainer_name`` within ``gpu_memory_gb`` GiB; return {plans_name, plans_file, plans}."""
    trainer_class = find_trainer(trainer_name)
    if not math_isfinite(gpu_memory_gb):
        raise ValueError(f"--gpu-memory {gpu_memory_gb} is not a number of GB.")
    requested = list(configurations or [c for c in DEFAULT_CONFIGURATIONS
                                        if CONFIGURATION_DIMS[c] in trainer_class.supported_dims])
    unknown = [c for c in requested if c not in CONFIGURATION_DIMS]
    if unknown:
        raise ValueError(f"Unknown configuration(s) {unknown}; choose from {sorted(CONFIGURATION_DIMS)}.")
    unsupported = [c for c in requested if CONFIGURATION_DIMS[c] not in trainer_class.supported_dims]
    if unsupported:
        raise ValueError(f"{trainer_name} trains only {'/'.join(f'{d}D' for d in trainer_class.supported_dims)} "
                         f"configurations; drop {unsupported} from -c.")

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunetv2_mamba.planning.planner import BudgetTooSmallError, MambaMemoryPlanner

    dataset_name = maybe_convert_to_dataset_name(dataset)
    _ensure_fingerprint(dataset_name)
    plans_name = plans_name or default_plans_name(trainer_class, gpu_memory_gb)
    planner = MambaMemoryPlanner(dataset_name, trainer_class, max(gpu_memory_gb, 0.0), plans_name,
                                 dims=sorted({CONFIGURATION_DIMS[c] for c in requested}))
    planner.gpu_memory_gb = gpu_memory_gb
    kept = set(requested)
    if "3d_lowres" in kept and "3d_fullres" in kept:
        kept.add("3d_cascade_fullres")
    planner.kept_configurations = kept
    try:
        plans = planner.plan_experiment()
    except BudgetTooSmallError as error:
        prefix = (f"--gpu-memory {gpu_memory_gb:g} is not a positive size. "
                  if gpu_memory_gb <= 0 else "")
        raise ValueError(prefix + str(error)) from None
    missing = [c for c in requested if c not in plans["configurations"]]
    if missing:  # e.g. 3d_lowres: nnU-Net plans it only when the full-resolution patch is small
        logger.warning("nnU-Net planned no %s for this dataset.", missing)
    return {"plans_name": plans_name, "plans_file": planner.plans_file, "plans": plans,
            "dataset_name": dataset_name, "trainer": trainer_class.__name__}


def math_isfinite(value) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)


def next_commands(result: dict) -> List[str]:
    """Return the nnUNetv2_preprocess and nnUNetv2_train commands for the planned configurations."""
    dataset_id = _dataset_id(result["dataset_name"])
    configurations = [c for c in result["plans"]["configurations"] if c in CONFIGURATION_DIMS]
    commands = [f"nnUNetv2_preprocess -d {dataset_id} -plans_name {result['plans_name']} -c "
                + " ".join(configurations)]
    commands += [f"nnUNetv2_train {dataset_id} {c} 0 -tr {result['trainer']} -p {result['plans_name']}"
                 for c in configurations]
    return commands


def command_plan(args: argparse.Namespace) -> int:
    """Plan, write the plans file, print what it holds and the commands to run next."""
    result = plan_for_gpu(args.dataset, args.trainer, args.gpu_memory, args.configurations, args.plans_name)
    record = result["plans"]["nnunetv2_mamba_memory"]
    print(f"Plans for {result['trainer']} within {args.gpu_memory:g} GB written to {result['plans_file']}")
    for name, config in result["plans"]["configurations"].items():
        estimate = record["estimates"].get(name)
        if estimate:
            print(f"  {name}: patch {list(config['patch_size'])}, batch {config['batch_size']}, estimated "
                  f"{estimate['needed_gib']:.1f} GB ({estimate['peak_allocated_gib']:.1f} GB allocated)")
    print(f"\nPlans name (pass as -p): {result['plans_name']}\nNext:")
    for command in next_commands(result):
        print(f"  {command}")
    return 0


def add_plan_subcommand(sub) -> None:
    """Register ``plan`` on the ``nnunetv2_mamba`` parser."""
    plan = sub.add_parser("plan", help="nnU-Net plans (patch, batch) that fit a GPU's memory with a trainer")
    plan.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    plan.add_argument("-tr", "--trainer", required=True, help="trainer class name (see `nnunetv2_mamba list`)")
    plan.add_argument("--gpu-memory", required=True, type=float, help="GPU memory to plan for, in GB (GiB)")
    plan.add_argument("-c", "--configurations", nargs="+", help="configurations to plan (default: 2d and "
                      "3d_fullres, those the trainer supports); 3d_lowres is also possible")
    plan.add_argument("--plans-name", help="plans identifier (default: nnUNetPlans_<family>_<GB>G)")
    plan.set_defaults(func=command_plan)
