"""nnU-Net's experiment planning with the VRAM estimate of a plugin network instead of nnU-Net's U-Net.

``MambaMemoryPlanner`` is nnU-Net's ``ExperimentPlanner`` with one change: where nnU-Net compares its U-Net
feature-map estimate to a reference value scaled to the GPU target, it compares our estimate of the training
step (``nnunetv2_mamba.planning.memory``, batch 2) to the budget in bytes. Everything else is nnU-Net's: the
initial patch from the spacing's aspect ratio clipped to the median shape, the loop that shrinks the axis with
the largest ratio to the median shape, the topology from ``get_pool_and_conv_props``, batch at least 2 and the
5 % dataset-coverage cap. Only the batch size is then recomputed exactly: the largest batch whose estimate
fits (nnU-Net scales it linearly, which overshoots when the state is a large part of the estimate).

The mapping onto nnU-Net's numbers: with ``UNet_reference_val_corresp_GB = 1`` and ``UNet_reference_val_xd =
GIB``, nnU-Net's ``reference`` is the budget in bytes; nnU-Net shrinks while ``estimate / ref_bs * 2 >
reference``, so returning ``needed_bytes(batch 2) * ref_bs / 2`` makes that test "the batch-2 step does not fit".
"""
from __future__ import annotations

import logging
import math
import os
from copy import deepcopy
from typing import Dict, Optional, Sequence

import numpy as np

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnunetv2_mamba.planning.memory import GIB, MemoryEstimator
from nnunetv2_mamba.plans import NetworkPlan

logger = logging.getLogger(__name__)

#: Smallest patch edge the planner may reach (voxels; or the median shape's edge if smaller).
MIN_PATCH_EDGE = 8
#: Key of the plugin's record in the plans file.
PLANS_RECORD_KEY = "nnunetv2_mamba_memory"


class BudgetTooSmallError(ValueError):
    """No patch of at least MIN_PATCH_EDGE per axis fits the GPU memory budget at batch 2."""


class MambaMemoryPlanner(ExperimentPlanner):
    """ExperimentPlanner whose VRAM estimate is the plugin trainer's network (for the dims in ``dims``)."""

    def __init__(self, dataset_name_or_id, trainer_class, gpu_memory_gb: float, plans_name: str,
                 dims: Sequence[int] = (2, 3)):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb=gpu_memory_gb, plans_name=plans_name)
        self.trainer_class = trainer_class
        self.gpu_memory_gb = float(gpu_memory_gb)
        self.estimator = MemoryEstimator.for_trainer(trainer_class)
        self.dims = tuple(dims)
        self.estimates: Dict[str, dict] = {}
        self._unet_reference = (self.UNet_reference_val_2d, self.UNet_reference_val_3d,
                                self.UNet_reference_val_corresp_GB)
        self._ours = False
        self._median_shape = None
        self._last_patch, self._last_arch = None, None

    # --- nnU-Net's hooks ------------------------------------------------------------------------------------
    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        dim = len(spacing)
        self._ours = dim in self.dims
        if self._ours:  # nnU-Net's reference becomes the budget in bytes (see the module docstring)
            self.UNet_reference_val_2d = self.UNet_reference_val_3d = GIB
            self.UNet_reference_val_corresp_GB = 1
            _cache = {}  # nnU-Net's cache holds U-Net estimates for other dims; ours are cached per topology
        else:  # a configuration the user did not ask for: nnU-Net's own numbers
            self.UNet_reference_val_2d, self.UNet_reference_val_3d, self.UNet_reference_val_corresp_GB = \
                self._unet_reference
        self._median_shape = [int(v) for v in median_shape[:dim]]
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if self._ours:
            network_plan = self._network_plan(plan["patch_size"], plan["architecture"]["arch_kwargs"])
            plan["batch_size"] = self._fitting_batch_size(network_plan, approximate_n_voxels_dataset)
            self.estimates[data_identifier] = self.estimator.estimate(network_plan, plan["batch_size"]).as_dict()
        return plan

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name,
                                   arch_kwargs, arch_kwargs_req_import):
        """Return our estimate in nnU-Net's units (an instance method: nnU-Net calls it through self)."""
        if not self._ours:
            return ExperimentPlanner.static_estimate_VRAM_usage(patch_size, input_channels, output_channels,
                                                                arch_class_name, arch_kwargs,
                                                                arch_kwargs_req_import)
        floor = [min(MIN_PATCH_EDGE, edge) for edge in self._median_shape]
        if any(int(p) < f for p, f in zip(patch_size, floor)) and self._last_patch is not None:
            smallest = self.estimator.estimate(self._network_plan(self._last_patch, self._last_arch), 2)
            needed = math.ceil(smallest.needed_bytes / GIB * 10) / 10
            raise BudgetTooSmallError(
                f"--gpu-memory {self.gpu_memory_gb:g} GB is too small for {self.trainer_class.__name__}: the "
                f"smallest patch it plans, {list(self._last_patch)} at batch 2, needs about {needed:g} GB. "
                f"Give --gpu-memory {needed:g} or more.")
        self._last_patch, self._last_arch = [int(v) for v in patch_size], deepcopy(arch_kwargs)
        network_plan = self._network_plan(patch_size, arch_kwargs, input_channels, output_channels)
        ref_bs = self.UNet_reference_val_corresp_bs_2d if len(patch_size) == 2 else \
            self.UNet_reference_val_corresp_bs_3d
        return self.estimator.estimate(network_plan, 2).needed_bytes * ref_bs / 2

    def save_plans(self, plans):
        """Write the plans file atomically (tmp file + rename), with the memory record; no merge with old files."""
        import json

        plans["configurations"] = {name: config for name, config in plans["configurations"].items()
                                   if name in self.kept_configurations}
        plans[PLANS_RECORD_KEY] = {
            "trainer": self.trainer_class.__name__, "network_family": self.trainer_class.network_family,
            "gpu_memory_gb": self.gpu_memory_gb, "gb_unit": "GiB (2**30 bytes)",
            "estimates": {name: self.estimates.get(config.get("data_identifier"))
                          for name, config in plans["configurations"].items() if "data_identifier" in config},
            "note": "peak_allocated_gib is the estimated torch.cuda.max_memory_allocated of one fp16-AMP training "
                    "step; needed_gib adds the CUDA context and a planning margin (see BENCHMARKS.md)."}
        recursive_fix_for_json_export(plans)
        target = self.plans_file
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temporary = target + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(plans, handle, indent=4, sort_keys=False)
        os.replace(temporary, target)

    # --- helpers --------------------------------------------------------------------------------------------
    kept_configurations: Sequence[str] = ()

    @property
    def plans_file(self) -> str:
        from nnunetv2.paths import nnUNet_preprocessed

        return os.path.join(nnUNet_preprocessed, self.dataset_name, self.plans_identifier + ".json")

    def _network_plan(self, patch_size, arch_kwargs, input_channels: Optional[int] = None,
                      output_channels: Optional[int] = None) -> NetworkPlan:
        channels = len(self.dataset_json["channel_names"]) if input_channels is None else input_channels
        classes = len(self.dataset_json["labels"]) if output_channels is None else output_channels
        return NetworkPlan.from_arch_kwargs(arch_kwargs, patch_size, channels, classes,
                                            ("conv_op", "norm_op", "dropout_op", "nonlin"))

    def _fitting_batch_size(self, network_plan: NetworkPlan, approximate_n_voxels_dataset: float) -> int:
        """Return the largest batch that fits, capped at 5 % of the dataset, at least nnU-Net's minimum (2)."""
        budget = self.gpu_memory_gb * GIB
        cap = round(approximate_n_voxels_dataset * self.max_dataset_covered /
                    np.prod(network_plan.patch_size, dtype=np.float64))
        batch = self.UNet_min_batch_size
        while batch < cap and self.estimator.estimate(network_plan, batch + 1).needed_bytes <= budget:
            batch += 1
        return batch
