"""Turn an nnU-Net configuration into plain network constructor arguments, in one place for all families.

``NetworkPlan.from_nnunet(plans_manager, configuration_manager, num_input_channels, num_output_channels)``
reads ``configuration_manager.network_arch_init_kwargs`` and ``patch_size`` (duck-typed: nothing from
nnunetv2 is imported), deep-copies every list (nnU-Net caches configurations, so an in-place edit would leak
into later networks) and validates the result with messages that name the plan value and the fix.
"""
from __future__ import annotations

import copy
import pydoc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


class PlanError(ValueError):
    """The nnU-Net plan cannot be turned into this network; the message says which value and why."""


def _locate(value: Any, key: str) -> Any:
    """Resolve a dotted class path from the plans (e.g. 'torch.nn.modules.conv.Conv3d') to the object."""
    if value is None or not isinstance(value, str):
        return value
    located = pydoc.locate(value)
    if located is None:
        raise PlanError(f"Plan entry {key}={value!r} does not name an importable object.")
    return located


def _per_axis(values: Any, n_stages: int, dim: int, key: str) -> List[List[int]]:
    """Return a list of n_stages per-axis int lists, expanding scalars (plans may store ints)."""
    if isinstance(values, (int, np.integer)):
        values = [values] * n_stages
    values = list(values)
    if len(values) != n_stages:
        raise PlanError(f"Plan entry {key} has {len(values)} entries but n_stages is {n_stages}.")
    result = []
    for stage, value in enumerate(values):
        axes = [int(value)] * dim if isinstance(value, (int, np.integer)) else [int(v) for v in value]
        if len(axes) != dim:
            raise PlanError(f"Plan entry {key}[{stage}]={list(value)} has {len(axes)} axes; the patch has {dim}.")
        result.append(axes)
    return result


def _per_stage(values: Any, count: int, key: str) -> List[int]:
    if isinstance(values, (int, np.integer)):
        return [int(values)] * count
    values = [int(v) for v in values]
    if len(values) != count:
        raise PlanError(f"Plan entry {key} has {len(values)} entries; expected {count}.")
    return values


@dataclass
class NetworkPlan:
    """Plain constructor arguments of a U-Net-shaped network (lists are private copies)."""

    input_channels: int
    num_classes: int
    patch_size: Tuple[int, ...]
    n_stages: int
    features_per_stage: List[int]
    kernel_sizes: List[List[int]]
    strides: List[List[int]]
    n_blocks_per_stage: List[int]
    n_conv_per_stage_decoder: List[int]
    conv_op: Any
    conv_bias: bool = True
    norm_op: Any = None
    norm_op_kwargs: Dict[str, Any] = field(default_factory=dict)
    dropout_op: Any = None
    dropout_op_kwargs: Optional[Dict[str, Any]] = None
    nonlin: Any = None
    nonlin_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Return the number of spatial axes (2 or 3)."""
        return len(self.patch_size)

    def stage_sizes(self) -> List[Tuple[int, ...]]:
        """Return the feature-map size of every encoder stage: patch // cumulative stride (floor)."""
        sizes, current = [], np.array(self.patch_size, dtype=np.int64)
        for stride in self.strides:
            current = current // np.array(stride, dtype=np.int64)
            sizes.append(tuple(int(v) for v in current))
        return sizes

    def network_kwargs(self) -> Dict[str, Any]:
        """Return the fields as a dict of keyword arguments (deep copies)."""
        return copy.deepcopy({name: getattr(self, name) for name in self.__dataclass_fields__})

    def unet_kwargs(self, with_input_size: bool = False) -> Dict[str, Any]:
        """Return deep-copied U-Net constructor keywords (dynamic_network_architectures' names).

        ``with_input_size`` adds ``input_size`` (the patch size) for networks whose layers depend on it.
        """
        kwargs = self.network_kwargs()
        patch_size = kwargs.pop("patch_size")
        if with_input_size:
            kwargs["input_size"] = patch_size
        return kwargs

    @classmethod
    def from_nnunet(cls, plans_manager, configuration_manager, num_input_channels: int,
                    num_output_channels: int) -> "NetworkPlan":
        """Return the plan of an nnU-Net configuration; ``plans_manager`` is accepted for API symmetry."""
        arch = copy.deepcopy(dict(configuration_manager.network_arch_init_kwargs))
        patch_size = tuple(int(v) for v in configuration_manager.patch_size)
        return cls.from_arch_kwargs(arch, patch_size, num_input_channels, num_output_channels,
                                    configuration_manager.network_arch_init_kwargs_req_import)

    @classmethod
    def from_arch_kwargs(cls, arch_kwargs: Dict[str, Any], patch_size: Sequence[int], input_channels: int,
                         num_classes: int, req_import: Sequence[str] = ()) -> "NetworkPlan":
        """Return the plan built from nnU-Net ``arch_kwargs`` (the dict in plans.json) and a patch size."""
        arch = copy.deepcopy(dict(arch_kwargs))
        for key in req_import or ():
            if key in arch:
                arch[key] = _locate(arch[key], key)
        for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
            arch[key] = _locate(arch.get(key), key)
        patch_size = tuple(int(v) for v in patch_size)
        dim = len(patch_size)
        if dim not in (2, 3):
            raise PlanError(f"patch_size {list(patch_size)} has {dim} axes; only 2D and 3D are supported.")
        missing = [key for key in ("n_stages", "features_per_stage", "kernel_sizes", "strides") if key not in arch]
        if missing:
            raise PlanError(f"The configuration's architecture kwargs lack {missing}; re-run "
                            "nnUNetv2_plan_and_preprocess with nnU-Net >= 2.4 plans.")
        n_stages = int(arch["n_stages"])
        features = _per_stage(arch["features_per_stage"], n_stages, "features_per_stage")
        kernels = _per_axis(arch["kernel_sizes"], n_stages, dim, "kernel_sizes")
        strides = _per_axis(arch["strides"], n_stages, dim, "strides")
        blocks_key = "n_blocks_per_stage" if "n_blocks_per_stage" in arch else "n_conv_per_stage"
        if blocks_key not in arch:
            raise PlanError("The plan has neither n_blocks_per_stage nor n_conv_per_stage.")
        blocks = _per_stage(arch[blocks_key], n_stages, blocks_key)
        decoder_blocks = _per_stage(arch.get("n_conv_per_stage_decoder", 1), n_stages - 1,
                                    "n_conv_per_stage_decoder")
        plan = cls(
            input_channels=int(input_channels), num_classes=int(num_classes), patch_size=patch_size,
            n_stages=n_stages, features_per_stage=features, kernel_sizes=kernels, strides=strides,
            n_blocks_per_stage=blocks, n_conv_per_stage_decoder=decoder_blocks, conv_op=arch["conv_op"],
            conv_bias=bool(arch.get("conv_bias", True)), norm_op=arch.get("norm_op"),
            norm_op_kwargs=dict(arch.get("norm_op_kwargs") or {}), dropout_op=arch.get("dropout_op"),
            dropout_op_kwargs=arch.get("dropout_op_kwargs"), nonlin=arch.get("nonlin"),
            nonlin_kwargs=dict(arch.get("nonlin_kwargs") or {}))
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise PlanError if the patch size is not divisible by the cumulative strides."""
        cumulative = np.ones(self.dim, dtype=np.int64)
        for stage, stride in enumerate(self.strides):
            cumulative = cumulative * np.array(stride, dtype=np.int64)
            if any(p % c for p, c in zip(self.patch_size, cumulative)):
                raise PlanError(f"patch_size {list(self.patch_size)} is not divisible by the cumulative stride "
                                f"{cumulative.tolist()} of stage {stage}; use a patch size that is a multiple of "
                                f"{cumulative.tolist()} (nnU-Net plans always are).")
