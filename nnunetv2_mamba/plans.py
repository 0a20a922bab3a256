"""The one place where an nnU-Net plan enters the plugin's networks (ARCHITECTURES.md §0.2).

``NetworkPlan.from_nnunet(plans_manager, configuration_manager, num_input_channels, num_output_channels)``
reads ``configuration_manager.network_arch_init_kwargs`` and ``patch_size`` (duck-typed: nothing from nnunetv2
is imported), deep-copies them once (nnU-Net caches configurations, so an in-place edit would leak into later
networks), normalises them (ints expanded to per-stage / per-axis lists of Python ints, dotted class paths
resolved) and validates them (2D/3D, one entry per stage, one per axis, conv_op of the patch's dimension,
patch divisible by every cumulative stride), with ``PlanError`` messages that name the plan value and the fix.

The networks take these already-normal values as explicit constructor arguments, never modify or keep the
caller's lists, and check them only with short asserts (as dynamic_network_architectures does).
"""
from __future__ import annotations

import copy
import pydoc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, convert_dim_to_conv_op
from torch import nn


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


def _per_stage(values: Any, count: int, key: str) -> List[int]:
    """Return ``count`` ints (a plan may store one int for every stage)."""
    if isinstance(values, (int, np.integer)):
        return [int(values)] * count
    values = [int(v) for v in values]
    if len(values) != count:
        raise PlanError(f"Plan entry {key} has {len(values)} entries; expected {count}.")
    return values


def _per_axis(values: Any, n_stages: int, dim: int, key: str) -> List[List[int]]:
    """Return n_stages per-axis int lists, expanding scalars (plans may store ints)."""
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


def _conv_op_dim(conv_op: Any) -> Optional[int]:
    """Return the spatial dimension of a torch conv class, or None for anything else."""
    if not (isinstance(conv_op, type) and issubclass(conv_op, nn.modules.conv._ConvNd)):
        return None
    try:
        return convert_conv_op_to_dim(conv_op)
    except ValueError:  # transposed convs
        return None


@dataclass
class NetworkPlan:
    """Normalised, validated constructor arguments of a U-Net-shaped network (see the module docstring)."""

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

    def unet_kwargs(self, with_input_size: bool = False) -> Dict[str, Any]:
        """Return the U-Net constructor keywords (dynamic_network_architectures' names) of this plan.

        The values are the plan's own (no copies: networks never modify or keep their arguments' lists).
        ``with_input_size`` adds ``input_size`` (the patch size) for networks whose layers depend on it.
        """
        kwargs = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "patch_size"}
        if with_input_size:
            kwargs["input_size"] = self.patch_size
        return kwargs

    def require_dim(self, supported_dims: Sequence[int], network: str, hint: str = "") -> None:
        """Raise PlanError unless this plan's dimension is one of ``supported_dims`` (``network`` names the user)."""
        if self.dim in supported_dims:
            return
        choice = "3d_fullres" if 3 in supported_dims else "2d"
        raise PlanError(f"{network} supports {' and '.join(f'{d}D' for d in supported_dims)} configurations; this "
                        f"configuration is {self.dim}D (patch size {list(self.patch_size)}). Choose a {choice} "
                        f"configuration.{' ' + hint if hint else ''}")

    @classmethod
    def from_nnunet(cls, plans_manager, configuration_manager, num_input_channels: int,
                    num_output_channels: int) -> "NetworkPlan":
        """Return the plan of an nnU-Net configuration; ``plans_manager`` is accepted for API symmetry."""
        return cls.from_arch_kwargs(configuration_manager.network_arch_init_kwargs, configuration_manager.patch_size,
                                    num_input_channels, num_output_channels,
                                    configuration_manager.network_arch_init_kwargs_req_import)

    @classmethod
    def from_arch_kwargs(cls, arch_kwargs: Dict[str, Any], patch_size: Sequence[int], input_channels: int,
                         num_classes: int, req_import: Sequence[str] = ()) -> "NetworkPlan":
        """Return the plan built from nnU-Net ``arch_kwargs`` (the dict in plans.json) and a patch size."""
        arch = copy.deepcopy(dict(arch_kwargs))
        for key in set(req_import or ()) | {"conv_op", "norm_op", "dropout_op", "nonlin"}:
            if key in arch:
                arch[key] = _locate(arch[key], key)
        patch_size = tuple(int(v) for v in patch_size)
        dim = len(patch_size)
        if dim not in (2, 3):
            raise PlanError(f"patch_size {list(patch_size)} has {dim} axes; only 2D and 3D are supported.")
        missing = [key for key in ("n_stages", "features_per_stage", "kernel_sizes", "strides") if key not in arch]
        if missing:
            raise PlanError(f"The configuration's architecture kwargs lack {missing}; re-run "
                            "nnUNetv2_plan_and_preprocess with nnU-Net >= 2.4 plans.")
        n_stages = int(arch["n_stages"])
        blocks_key = "n_blocks_per_stage" if "n_blocks_per_stage" in arch else "n_conv_per_stage"
        if blocks_key not in arch:
            raise PlanError("The plan has neither n_blocks_per_stage nor n_conv_per_stage.")
        plan = cls(
            input_channels=int(input_channels), num_classes=int(num_classes), patch_size=patch_size,
            n_stages=n_stages,
            features_per_stage=_per_stage(arch["features_per_stage"], n_stages, "features_per_stage"),
            kernel_sizes=_per_axis(arch["kernel_sizes"], n_stages, dim, "kernel_sizes"),
            strides=_per_axis(arch["strides"], n_stages, dim, "strides"),
            n_blocks_per_stage=_per_stage(arch[blocks_key], n_stages, blocks_key),
            n_conv_per_stage_decoder=_per_stage(arch.get("n_conv_per_stage_decoder", 1), n_stages - 1,
                                                "n_conv_per_stage_decoder"),
            conv_op=arch.get("conv_op"), conv_bias=bool(arch.get("conv_bias", True)), norm_op=arch.get("norm_op"),
            norm_op_kwargs=arch.get("norm_op_kwargs") or {}, dropout_op=arch.get("dropout_op"),
            dropout_op_kwargs=arch.get("dropout_op_kwargs"), nonlin=arch.get("nonlin"),
            nonlin_kwargs=arch.get("nonlin_kwargs") or {})
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise PlanError if conv_op does not fit the patch, a stage has no block, or the patch is not
        divisible by the cumulative strides."""
        if _conv_op_dim(self.conv_op) != self.dim:
            raise PlanError(f"Plan entry conv_op={getattr(self.conv_op, '__name__', self.conv_op)!r} does not match "
                            f"the {self.dim}D patch size {list(self.patch_size)}; use "
                            f"{convert_dim_to_conv_op(self.dim).__name__}.")
        for key, counts in (("n_blocks_per_stage / n_conv_per_stage", self.n_blocks_per_stage),
                            ("n_conv_per_stage_decoder", self.n_conv_per_stage_decoder)):
            if counts and min(counts) < 1:
                raise PlanError(f"Plan entry {key}={counts} has a stage without blocks; every stage needs at "
                                "least one (nnU-Net plans always have).")
        cumulative = np.ones(self.dim, dtype=np.int64)
        for stage, stride in enumerate(self.strides):
            cumulative = cumulative * np.array(stride, dtype=np.int64)
            if any(p % c for p, c in zip(self.patch_size, cumulative)):
                raise PlanError(f"patch_size {list(self.patch_size)} is not divisible by the cumulative stride "
                                f"{cumulative.tolist()} of stage {stage}; use a patch size that is a multiple of "
                                f"{cumulative.tolist()} (nnU-Net plans always are).")
