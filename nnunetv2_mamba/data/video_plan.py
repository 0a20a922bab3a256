"""Vivim's configurations in a dataset's nnU-Net plans (ARCHITECTURES.md §4.1), added after nnU-Net's planner.

``nnunetv2_mamba video plan -d DATASET`` reads ``$nnUNet_preprocessed/<dataset>/nnUNetPlans.json`` (written by
``nnUNetv2_plan_and_preprocess``) and adds two configurations, keeping everything else of the file::

    3d_fullres_vivim     inherits_from 3d_fullres;       patch [5, H, W]; Vivim with the "alternating" mixer
    3d_fullres_vivim_v3  inherits_from 3d_fullres_vivim; Vivim with the "st_v3" mixer

H and W are the median frame size rounded up to a multiple of MiT's total stride (32), at most 256 (the paper's
crops); the architecture entry names the Vivim network and all of its constructor arguments (the plan records
the network that is built; nothing in nnU-Net reads U-Net stages from it because deep supervision is off).
Everything else, ``data_identifier`` included, is inherited from 3d_fullres: nnU-Net's preprocessed values depend
on the spacing, normalisation and resampling, not on the network (the patch only sets the blosc2 block layout),
so both Vivim configurations train on 3d_fullres's preprocessed data and need no preprocessing run of their own.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

from nnunetv2_mamba.io import atomic_write
from nnunetv2_mamba.plans import PlanError

logger = logging.getLogger(__name__)

#: ``network_class_name`` of the Vivim configurations.
VIVIM_NETWORK_CLASS = "nnunetv2_mamba.network_architectures.vivim.Vivim"
#: The configuration the Vivim configurations inherit from (time kept at the clips' spacing).
BASE_CONFIGURATION = "3d_fullres"
#: Configuration name per Temporal-Mamba mixer (the first one is the parent of the others).
VIVIM_CONFIGURATIONS = {"alternating": "3d_fullres_vivim", "st_v3": "3d_fullres_vivim_v3"}
#: Constructor arguments that are not architecture: given by the dataset (channels, classes) or chosen at run
#: time (the scan backend: $NNUNETV2_MAMBA_BACKEND).
_NOT_ARCHITECTURE = ("self", "input_channels", "num_classes", "backend")


def plan_command(dataset: str = "DATASET") -> str:
    """Return the command that writes the Vivim configurations (used in error messages)."""
    return f"nnunetv2_mamba video plan -d {dataset}"


def vivim_arch_kwargs(nframes: int, mixer: str) -> Dict[str, object]:
    """Return every architecture argument of ``Vivim`` (its defaults: MiT-B3, 2 TMB layers per stage) as JSON.

    Written into the plans so that a trained model keeps describing (and rebuilding) the same network even if
    the defaults change later.
    """
    from nnunetv2_mamba.network_architectures.vivim import Vivim

    kwargs: Dict[str, object] = {}
    for name, parameter in inspect.signature(Vivim.__init__).parameters.items():
        if name in _NOT_ARCHITECTURE or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        kwargs[name] = list(default) if isinstance(default, (tuple, list)) else default
    kwargs.update(nframes=int(nframes), mixer=mixer)
    return kwargs


def video_patch_size(median_inplane: Sequence[float], nframes: int = 5, max_inplane: int = 256,
                     multiple: int = 32):
    """Return [nframes, H, W]: the median frame size rounded up to a multiple of ``multiple``, at most max_inplane."""
    if max_inplane % multiple:
        raise PlanError(f"max_inplane={max_inplane} must be a multiple of {multiple}.")
    inplane = [min(max_inplane, max(multiple, int(math.ceil(float(size) / multiple)) * multiple))
               for size in median_inplane]
    return [int(nframes)] + inplane


def check_time_axis(transpose_forward: Sequence[int], configuration_spacing: Sequence[float],
                    dataset_spacings: Sequence[Sequence[float]] = ()) -> None:
    """Raise PlanError unless time stays axis 0 and no clip is resampled along time."""
    if list(transpose_forward) != [0, 1, 2]:
        raise PlanError(f"nnU-Net transposes this dataset's axes (transpose_forward={list(transpose_forward)}), "
                        "so time would not be the first axis. Give time the largest spacing (datasets written "
                        "by `nnunetv2_mamba video convert` do) and re-run nnUNetv2_plan_and_preprocess.")
    time_spacings = sorted({round(float(spacing[0]), 6) for spacing in dataset_spacings})
    if len(time_spacings) > 1:
        raise PlanError(f"The clips have different time spacings {time_spacings}; nnU-Net would resample them "
                        "along time. Write every clip with the same spacing (video convert does).")
    if time_spacings and abs(float(configuration_spacing[0]) - time_spacings[0]) > 1e-4 * time_spacings[0]:
        raise PlanError(f"This configuration resamples along time (spacing {configuration_spacing[0]} vs the "
                        f"clips' {time_spacings[0]}); Vivim trains on 3d_fullres-based configurations only.")


def vivim_configurations(plans: dict, dataset_spacings: Sequence[Sequence[float]] = (), nframes: int = 5,
                         max_inplane: int = 256) -> Dict[str, dict]:
    """Return {name: configuration entry} of the Vivim configurations for nnU-Net plans (not modified)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_mamba.network_architectures.vivim import MIT_B3

    if int(nframes) < 1:
        raise PlanError(f"nframes must be at least 1; got {nframes}.")
    configurations = plans.get("configurations", {})
    if BASE_CONFIGURATION not in configurations:
        raise PlanError(f"The plans have no {BASE_CONFIGURATION} configuration (they have {sorted(configurations)}); "
                        f"run nnUNetv2_plan_and_preprocess -d DATASET -c {BASE_CONFIGURATION} first.")
    base = PlansManager(copy.deepcopy(plans)).get_configuration(BASE_CONFIGURATION).configuration
    if len(base["patch_size"]) != 3:
        raise PlanError(f"Vivim trains on 3D clips (frames, height, width); {BASE_CONFIGURATION} has patch size "
                        f"{list(base['patch_size'])}. Convert the videos with `nnunetv2_mamba video convert`.")
    check_time_axis(plans.get("transpose_forward", [0, 1, 2]), base["spacing"], dataset_spacings)
    median = base.get("median_image_size_in_voxels") or base["patch_size"]
    patch = video_patch_size(median[1:], nframes, max_inplane, multiple=math.prod(MIT_B3["patch_strides"]))
    entries: Dict[str, dict] = {}
    parent = None
    for mixer, name in VIVIM_CONFIGURATIONS.items():
        architecture = {"network_class_name": VIVIM_NETWORK_CLASS, "arch_kwargs": vivim_arch_kwargs(nframes, mixer),
                        "_kw_requires_import": []}
        if parent is None:
            entries[name] = {"inherits_from": BASE_CONFIGURATION, "patch_size": patch, "architecture": architecture}
            parent = name
        else:
            entries[name] = {"inherits_from": parent, "architecture": architecture}
    return entries


def add_vivim_configurations(plans: dict, dataset_spacings: Sequence[Sequence[float]] = (), nframes: int = 5,
                             max_inplane: int = 256) -> dict:
    """Return a copy of the plans with the Vivim configurations added (replaced if present)."""
    updated = copy.deepcopy(plans)
    updated["configurations"].update(vivim_configurations(plans, dataset_spacings, nframes, max_inplane))
    return updated


def _dataset_folder(dataset: Union[int, str], preprocessed_root: Optional[os.PathLike]) -> Path:
    """Return the preprocessed folder of a dataset given by id (501) or name (Dataset501_Polyps)."""
    root = preprocessed_root or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise PlanError("nnUNet_preprocessed is not set: set it (as for nnUNetv2_plan_and_preprocess) or pass "
                        "--preprocessed.")
    root = Path(root)
    name = str(dataset)
    if name.startswith("Dataset"):
        folder = root / name
    else:
        try:
            matches = sorted(root.glob(f"Dataset{int(name):03d}_*"))
        except ValueError:
            raise PlanError(f"Dataset {name!r}: give an id (501) or a name (Dataset501_Polyps).") from None
        folder = matches[0] if matches else root / f"Dataset{int(name):03d}"
    if not folder.is_dir():
        raise PlanError(f"{folder} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} -c "
                        f"{BASE_CONFIGURATION} first.")
    return folder


def plan_vivim(dataset: Union[int, str], plans_identifier: str = "nnUNetPlans",
               preprocessed_root: Optional[os.PathLike] = None, nframes: int = 5, max_inplane: int = 256) -> Path:
    """Add the Vivim configurations to a dataset's plans file (atomically); return the file."""
    folder = _dataset_folder(dataset, preprocessed_root)
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise PlanError(f"{plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset} -c "
                        f"{BASE_CONFIGURATION} first (or pass the plans identifier with -p).")
    plans = json.loads(plans_file.read_text())
    fingerprint = folder / "dataset_fingerprint.json"
    spacings = json.loads(fingerprint.read_text()).get("spacings", []) if fingerprint.is_file() else []
    updated = add_vivim_configurations(plans, spacings, nframes, max_inplane)
    atomic_write(plans_file, json.dumps(updated, indent=4))  # nnU-Net's layout, key order kept
    logger.info("Added %s to %s.", ", ".join(VIVIM_CONFIGURATIONS.values()), plans_file)
    return plans_file
