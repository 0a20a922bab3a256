"""Before/after fixture of every network the plugin ships (issue 10: behaviour must not change).

Run as a script from the repository root to (re)write ``fixtures/networks_before_issue10.pt``::

    PYTHONPATH=$PWD python tests/network_architectures/make_fixtures.py

Every network is built as training builds it: through its trainer's ``build_network_architecture`` (nnU-Net's
2.8 signature, also what the predictor calls) from a small nnU-Net configuration, under ``torch.manual_seed(0)``,
with the torch scan backend, in fp32 on the CPU, then run in eval mode on a fixed seeded input. Per network the
file holds the state_dict (packed: ``unpack_state``), the input, the output(s) (every deep-supervision output)
and the parameter count.

Vivim's trainer describes MiT-B3 in the plans, which is too large to store (58.7 M parameters); the stored Vivim
networks are tiny MiT widths built from the trainer-adjusted plan (``build_vivim_like_trainer``), and the
full-size network built by the trainer is pinned by a summary (hash of keys and shapes, parameter count,
per-tensor sums).
"""
from __future__ import annotations

import copy
import hashlib
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_mamba.network_architectures.vivim import build_vivim
from nnunetv2_mamba.data.video_plan import VIVIM_CONFIGURATIONS, add_vivim_configurations
from nnunetv2_mamba.ssm import BACKEND_ENV_VAR
from nnunetv2_mamba.trainers.logvmamba import nnUNetTrainerGVMamba, nnUNetTrainerLoGVMamba, nnUNetTrainerLVMamba
from nnunetv2_mamba.trainers.taming import (nnUNetTrainerBiSegMamba, nnUNetTrainerMultiSegMamba,
                                            nnUNetTrainerSegMamba, nnUNetTrainerSegMambaSkip)
from nnunetv2_mamba.trainers.umamba import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEnc
from nnunetv2_mamba.trainers.vivim import nnUNetTrainerVivim, nnUNetTrainerVivimV3
from tests import builders
from tests.builders import arch_kwargs

FIXTURE_PATH = Path(__file__).resolve().parent / "fixtures" / "networks_before_issue10.pt"
SEED = 0
INPUT_SEED = 1
INPUT_CHANNELS, NUM_CLASSES = 2, 3
#: Tiny MiT widths for the stored Vivim networks (the trainer's plan otherwise describes MiT-B3).
TINY_VIVIM = dict(embed_dims=(8, 8, 8, 8), mit_depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), sr_ratios=(2, 2, 1, 1),
                  tmb_depths=(2, 1, 1, 1), decoder_dim=8)


def configuration(patch, features, strides, kernels=None, n_conv=2, n_conv_decoder=1,
                  blocks_key="n_conv_per_stage") -> dict:
    """Return an nnU-Net 2.8 plans configuration for a tiny network."""
    arch = arch_kwargs(features, strides, kernels=kernels, blocks=n_conv, decoder_blocks=n_conv_decoder,
                       blocks_key=blocks_key)
    return builders.configuration(patch, arch)


UMAMBA_3D = configuration((4, 16, 16), [4, 4, 8, 8], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                          kernels=[[1, 3, 3], [3, 3, 3], [1, 3, 3], [3, 1, 3]], n_conv_decoder=2)
UMAMBA_2D = configuration((16, 32), [4, 4, 8, 8], [[1, 1], [2, 2], [2, 2], [2, 2]], n_conv_decoder=2)
# 3D LoG-VMamba: LoG stage maps (2, 4, 32) role L and (2, 4, 16) role LoG (GTX grid stride 2 along the last axis).
LOGVMAMBA_3D = configuration((2, 4, 64), [16, 16, 16], [[1, 1, 1], [1, 1, 2], [1, 1, 2]],
                             kernels=[[1, 1, 3], [1, 3, 1], [1, 1, 3]], n_conv=1)
LOGVMAMBA_2D = configuration((4, 256), [8, 8, 16, 16], [[1, 1], [1, 2], [2, 2], [2, 2]],
                             kernels=[[1, 3], [3, 1], [1, 3], [3, 3]], n_conv=1)
TAMING_3D = configuration((8, 8, 8), [4, 4, 8], [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                          kernels=[[1, 3, 3], [3, 3, 1], [1, 3, 3]], n_conv=1,
                          blocks_key="n_blocks_per_stage")
TAMING_2D = configuration((16, 12), [4, 8, 8], [[1, 1], [2, 2], [2, 2]], n_conv=1)
#: A 3d_fullres configuration as nnU-Net plans it for a video dataset; Vivim's trainer adjusts it.
VIVIM_3D = configuration((8, 64, 64), [32, 64, 128], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv=1)
VIVIM_3D["median_image_size_in_voxels"] = [6, 64, 64]

#: name -> (trainer class, configuration, deep supervision as the trainer trains: off for LoG-VMamba and Vivim).
NETWORKS = {
    "UMambaEnc_3d": (nnUNetTrainerUMambaEnc, UMAMBA_3D, True),
    "UMambaEnc_2d": (nnUNetTrainerUMambaEnc, UMAMBA_2D, True),
    "UMambaBot_3d": (nnUNetTrainerUMambaBot, UMAMBA_3D, True),
    "UMambaBot_2d": (nnUNetTrainerUMambaBot, UMAMBA_2D, True),
    "LoGVMamba_3d": (nnUNetTrainerLoGVMamba, LOGVMAMBA_3D, False),
    "LoGVMamba_2d": (nnUNetTrainerLoGVMamba, LOGVMAMBA_2D, False),
    "LVMamba_3d": (nnUNetTrainerLVMamba, LOGVMAMBA_3D, False),
    "LVMamba_2d": (nnUNetTrainerLVMamba, LOGVMAMBA_2D, False),
    "GVMamba_3d": (nnUNetTrainerGVMamba, LOGVMAMBA_3D, False),
    "GVMamba_2d": (nnUNetTrainerGVMamba, LOGVMAMBA_2D, False),
    "SegMamba_3d": (nnUNetTrainerSegMamba, TAMING_3D, True),
    "SegMamba_2d": (nnUNetTrainerSegMamba, TAMING_2D, True),
    "BiSegMamba_3d": (nnUNetTrainerBiSegMamba, TAMING_3D, True),
    "BiSegMamba_2d": (nnUNetTrainerBiSegMamba, TAMING_2D, True),
    "MultiSegMamba_3d": (nnUNetTrainerMultiSegMamba, TAMING_3D, True),
    "SegMambaSkip_3d": (nnUNetTrainerSegMambaSkip, TAMING_3D, True),
    "SegMambaSkip_2d": (nnUNetTrainerSegMambaSkip, TAMING_2D, True),
    "Vivim_3d": (nnUNetTrainerVivim, VIVIM_3D, False),
    "VivimV3_3d": (nnUNetTrainerVivimV3, VIVIM_3D, False),
}
VIVIM_NETWORKS = ("Vivim_3d", "VivimV3_3d")


def vivim_configuration_manager(trainer, planned: dict) -> ConfigurationManager:
    """Return the configuration Vivim's trainer trains with: the one `nnunetv2_mamba video plan` adds to the plans.

    Before issue 10 the trainer adjusted 3d_fullres itself (patch [frames, H, W], frames 2, in-plane at most 32 here);
    `video plan` now writes the same patch into 3d_fullres_vivim / 3d_fullres_vivim_v3, which inherit 3d_fullres.
    """
    plans = {"configurations": {"3d_fullres": copy.deepcopy(planned)}, "transpose_forward": [0, 1, 2]}
    plans = add_vivim_configurations(plans, nframes=2, max_inplane=32)
    name = VIVIM_CONFIGURATIONS[trainer.vivim_mixer]
    return PlansManager(plans).get_configuration(name)


def build_vivim_like_trainer(name: str) -> torch.nn.Module:
    """Return a tiny Vivim built from the planned Vivim configuration (whose arch_kwargs describe MiT-B3)."""
    trainer, planned, _ = NETWORKS[name]
    manager = vivim_configuration_manager(trainer, planned)
    arch_kwargs = {**manager.network_arch_init_kwargs, **TINY_VIVIM}
    torch.manual_seed(SEED)
    return build_vivim(manager.patch_size, INPUT_CHANNELS, NUM_CLASSES, **arch_kwargs)


def build_full_size_vivim(name: str) -> torch.nn.Module:
    """Return the full-size Vivim exactly as the trainer builds it (build_network_architecture)."""
    trainer, planned, deep_supervision = NETWORKS[name]
    manager = vivim_configuration_manager(trainer, planned)
    torch.manual_seed(SEED)
    return trainer.build_network_architecture(None, manager, INPUT_CHANNELS, NUM_CLASSES, deep_supervision)


def build_network(name: str) -> torch.nn.Module:
    """Return network ``name`` built through its trainer's build_network_architecture under the fixed seed."""
    if name in VIVIM_NETWORKS:
        return build_vivim_like_trainer(name)
    trainer, planned, deep_supervision = NETWORKS[name]
    manager = ConfigurationManager(copy.deepcopy(planned))
    torch.manual_seed(SEED)
    return trainer.build_network_architecture(None, manager, INPUT_CHANNELS, NUM_CLASSES, deep_supervision)


def network_input(name: str) -> torch.Tensor:
    """Return the fixed input of network ``name``: (1, channels, *patch) from its own seeded generator."""
    trainer, planned, _ = NETWORKS[name]
    patch = vivim_configuration_manager(trainer, planned).patch_size if name in VIVIM_NETWORKS else \
        planned["patch_size"]
    return torch.randn(1, INPUT_CHANNELS, *patch, generator=torch.Generator().manual_seed(INPUT_SEED))


def run(network: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Return the network's outputs in eval mode as a list (deep supervision: highest resolution first)."""
    network.eval()
    with torch.no_grad():
        outputs = network(x)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def parameter_count(network: torch.nn.Module) -> int:
    """Return the number of (de-duplicated) parameters."""
    return sum(p.numel() for p in network.parameters())


def summary(network: torch.nn.Module) -> Dict[str, object]:
    """Return a hash of keys and shapes, the parameter count and per-tensor float64 sums (for a large network)."""
    state = network.state_dict()
    layout = "\n".join(f"{key}:{list(value.shape)}" for key, value in state.items())
    return {"layout_sha256": hashlib.sha256(layout.encode()).hexdigest(), "n_keys": len(state),
            "sums": torch.stack([value.double().sum() for value in state.values()]),
            "parameter_count": parameter_count(network)}


def pack_state(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Return a state_dict as one flat tensor per dtype plus keys and shapes (small on disk).

    A key that names the same tensor as an earlier key (``decoder.encoder.X`` shares ``encoder.X``;
    dynamic_network_architectures' ``all_modules.0`` is its ``conv``) is stored as ``[prefix, i]`` when it is
    prefix + key i, else as ``[key, -1 - i]``.
    """
    entries, shapes, dtypes, chunks, seen = [], [], [], {}, {}
    for key, value in state.items():
        identity = (value.data_ptr(), tuple(value.shape), value.dtype)
        source = seen.get(identity) if value.numel() else None
        if source is not None:
            ends_with_source = key.endswith(entries[source])
            entries.append([sys.intern(key[:-len(entries[source])]), source] if ends_with_source else
                           [key, -1 - source])
            continue
        seen.setdefault(identity, len(entries))
        entries.append(key)
        shapes.append(list(value.shape))
        dtypes.append(sys.intern(str(value.dtype)))
        chunks.setdefault(dtypes[-1], []).append(value.reshape(-1))
    return {"entries": entries, "shapes": shapes, "dtypes": dtypes,
            "flat": {dtype: torch.cat(values) for dtype, values in chunks.items()}}


def unpack_state(packed: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """Return the state_dict (key order kept) of ``pack_state``'s result."""
    offsets = {dtype: 0 for dtype in packed["flat"]}
    owners = iter(zip(packed["shapes"], packed["dtypes"]))
    keys, state = [], {}
    for entry in packed["entries"]:
        if isinstance(entry, list):  # an alias of an earlier key: [prefix, i] or [key, -1 - i]
            name, source = entry
            keys.append(name + keys[source] if source >= 0 else name)
            source = source if source >= 0 else -1 - source
            state[keys[-1]] = state[keys[source]]
            continue
        shape, dtype = next(owners)
        count = int(torch.Size(shape).numel())
        keys.append(entry)
        state[entry] = packed["flat"][dtype][offsets[dtype]:offsets[dtype] + count].reshape(shape)
        offsets[dtype] += count
    return state


def make_fixtures() -> Dict[str, Dict[str, object]]:
    """Return the fixture of every network: state_dict, input, outputs, parameter count (+ full-size Vivim)."""
    os.environ[BACKEND_ENV_VAR] = "torch"
    torch.set_default_dtype(torch.float32)
    fixtures: Dict[str, Dict[str, object]] = {}
    for name in NETWORKS:
        network = build_network(name)
        x = network_input(name)
        fixtures[name] = {"state_dict": pack_state(network.state_dict()), "input": x,
                          "outputs": run(network, x), "parameter_count": parameter_count(network)}
    for name in VIVIM_NETWORKS:
        fixtures[f"{name}_full_size"] = summary(build_full_size_vivim(name))
    return fixtures


def main() -> int:
    fixtures = make_fixtures()
    FIXTURE_PATH.parent.mkdir(parents=True, exist_ok=True)
    temporary = FIXTURE_PATH.with_suffix(".tmp")
    torch.save(fixtures, temporary)
    temporary.replace(FIXTURE_PATH)  # never a half-written fixture
    for name, entry in fixtures.items():
        sys.stdout.write(f"{name}: {entry['parameter_count']} parameters\n")
    sys.stdout.write(f"wrote {FIXTURE_PATH} ({FIXTURE_PATH.stat().st_size} bytes)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
