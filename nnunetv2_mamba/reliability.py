"""Reliability helpers for the trainers: atomic checkpoint files, clear messages for missing checkpoints,
skipped non-finite steps, out-of-memory reports and the plugin version stored in checkpoints.

Nothing here imports nnU-Net; the trainers' base class (``nnunetv2_mamba.trainers.base``) wires it in.
"""
from __future__ import annotations

import logging
import os
import re
import types
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from nnunetv2_mamba.io import staged_file
from nnunetv2_mamba.version import __version__

logger = logging.getLogger(__name__)

#: The checkpoints nnU-Net writes into a fold folder, in the order ``--c`` looks for them.
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: Top-level checkpoint key holding the plugin's own metadata (nnU-Net ignores unknown keys).
CHECKPOINT_KEY = "nnunetv2_mamba"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message lists what the folder holds and what to pass."""


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite losses."""


class MambaOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """A step of a plugin network ran out of GPU memory; the message says which network, sizes and what to do.

    A torch.cuda.OutOfMemoryError (so a RuntimeError): handlers of either still catch it, e.g. nnU-Net's
    predictor, which retries a sliding window with its result arrays on the CPU.
    """


# ------------------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------------------

def atomic_save(write: Callable[[str], None], filename: str) -> bool:
    """Call ``write(temporary_path)`` and move the result over ``filename`` in one step (nnunetv2_mamba.io.staged_file).

    At every moment ``filename`` is either the previous complete file or the new complete one; the temporary file is
    removed if ``write`` raises. Returns False if ``write`` wrote nothing (then nothing is replaced).
    """
    with staged_file(filename) as temporary:
        write(str(temporary))
        written = temporary.exists()
    return written


def atomic_torch_save(obj, filename: str) -> None:
    """``torch.save(obj, filename)``, atomically (see ``atomic_save``)."""
    atomic_save(lambda path: torch.save(obj, path), filename)


# ------------------------------------------------------------------------------------------------------------
# Missing / unreadable checkpoints
# ------------------------------------------------------------------------------------------------------------

def list_checkpoints(folder: str) -> List[str]:
    """Return the names of the ``*.pth`` files in ``folder`` (empty if it does not exist)."""
    path = Path(folder)
    return sorted(p.name for p in path.glob("*.pth")) if path.is_dir() else []


def describe_checkpoints(fold_folder: str) -> str:
    """Return one sentence saying which checkpoints this fold folder and its sibling folds hold."""
    fold_folder = Path(fold_folder)
    here = list_checkpoints(str(fold_folder))
    text = f"{fold_folder} holds {', '.join(here) if here else 'no checkpoint'}"
    if not fold_folder.is_dir():
        text = f"{fold_folder} does not exist"
    siblings = [f"{p.name}: {', '.join(list_checkpoints(str(p)))}" for p in sorted(fold_folder.parent.glob("fold_*"))
                if p != fold_folder and list_checkpoints(str(p))] if fold_folder.parent.is_dir() else []
    if siblings:
        text += f"; other folds: {'; '.join(siblings)}"
    return text + "."


def missing_continue_message(fold_folder: str) -> str:
    """Return the message for ``nnUNetv2_train ... --c`` when the fold folder has no checkpoint to resume."""
    fold_folder = Path(fold_folder)
    # A typo in -tr / -p / the configuration points at a new folder: name the runs of this dataset that exist.
    runs = sorted(f"{run.parent.name}/{run.name}" for run in fold_folder.parent.parent.glob(f"*/{fold_folder.name}")
                  if run != fold_folder and list_checkpoints(str(run)))
    others = f" Runs of this dataset with checkpoints: {', '.join(runs)}." if runs else ""
    return (f"--c was given but there is no checkpoint to continue from: {describe_checkpoints(str(fold_folder))}"
            f"{others} Pass the dataset, configuration, fold, -tr and -p of the run to continue (the folder name is "
            f"<trainer>__<plans>__<configuration>/fold_<fold>), or drop --c; starting a new training now.")


def require_checkpoint(model_folder: str, folds: Sequence, checkpoint_name: str = "checkpoint_final.pth") -> None:
    """Raise CheckpointError naming the existing checkpoints if a fold of ``model_folder`` lacks ``checkpoint_name``.

    Meant before nnU-Net's predictor loads a model folder, e.g. ``require_checkpoint(folder, (0,))``.
    """
    for fold in folds:
        fold_folder = Path(model_folder) / f"fold_{fold}"
        if (fold_folder / checkpoint_name).is_file():
            continue
        available = list_checkpoints(str(fold_folder))
        hint = ("the training of this fold has not finished: finish it with `nnUNetv2_train ... --c`, or predict "
                f"from another checkpoint with `nnUNetv2_predict ... -chk {available[0]}`" if available else
                "train this fold first (nnUNetv2_train), or pass the folds that exist with -f")
        raise CheckpointError(f"Cannot predict with fold {fold}: {checkpoint_name} is missing. "
                              f"{describe_checkpoints(str(fold_folder))} To fix: {hint}.")


def load_checkpoint_file(filename: str, map_location) -> dict:
    """Return ``torch.load(filename)`` or raise CheckpointError saying what exists / that the file is damaged."""
    if not os.path.isfile(filename):
        raise CheckpointError(f"Checkpoint {filename} does not exist. {describe_checkpoints(os.path.dirname(filename))}"
                              f" Pass one of the existing checkpoints.")
    try:
        return torch.load(filename, map_location=map_location, weights_only=False)
    except Exception as error:  # a truncated zip raises RuntimeError, a pickle from elsewhere UnpicklingError
        raise CheckpointError(f"Checkpoint {filename} cannot be read ({type(error).__name__}: {error}); it is "
                              f"damaged or not a torch checkpoint. {describe_checkpoints(os.path.dirname(filename))}"
                              f" Continue from another checkpoint or retrain this fold.") from None


# ------------------------------------------------------------------------------------------------------------
# Plugin version in checkpoints
# ------------------------------------------------------------------------------------------------------------

def checkpoint_metadata() -> dict:
    """Return the plugin's metadata stored under ``checkpoint[CHECKPOINT_KEY]``."""
    return {"version": __version__}


def _major_minor(version: str):
    numbers = re.findall(r"\d+", version)
    return tuple(int(n) for n in (numbers + ["0", "0"])[:2])


def check_checkpoint_version(checkpoint: dict, source: str = "the checkpoint") -> Optional[str]:
    """Return a warning if the checkpoint was written by another plugin version (None if the same).

    Checkpoints load across versions as long as their state_dict keys match (a mismatch is reported by
    ``load_state_dict``); the version is stated so that a user knows which code trained the model.
    """
    stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("version")
    if stored == __version__:
        return None
    if stored is None:
        return (f"{source} was written without a nnunetv2-mamba version (by a version older than 0.1.0 or by "
                f"plain nnU-Net); this is nnunetv2-mamba {__version__}. Loading it; the weights must still match "
                f"the network.")
    relation = "an older" if _major_minor(stored) < _major_minor(__version__) else "a newer"
    return (f"{source} was written by nnunetv2-mamba {stored}, {relation} version than the installed "
            f"{__version__}. Loading it; if its weights do not match the network, install nnunetv2-mamba=={stored}.")


# ------------------------------------------------------------------------------------------------------------
# Bad input found before the first step
# ------------------------------------------------------------------------------------------------------------

def check_requested_backend() -> None:
    """Raise BackendError now if $NNUNETV2_MAMBA_BACKEND names an unknown or uninstalled backend.

    Otherwise the error would come from the first forward pass, under a dozen frames of network code.
    Whether the backend supports the tensors (device, dtype) is still checked per call.
    """
    from nnunetv2_mamba.ssm.scan import BACKEND_ENV_VAR, BackendError, get_backend, requested_backend_name

    name = requested_backend_name()  # raises for unknown names, with the closest known one
    if name == "auto":
        return
    reason = get_backend(name).unavailable_reason()
    if reason is not None:
        raise BackendError(f"Selective-scan backend {name!r} was requested (${BACKEND_ENV_VAR}={name}) but cannot "
                           f"be used: {reason} Choose another backend or unset {BACKEND_ENV_VAR} for automatic "
                           f"selection.")


def channel_mismatch_message(data_channels: int, expected_channels: int, channel_names: dict) -> str:
    """Return the message for a batch whose channel count differs from the plans' / dataset.json's."""
    return (f"The preprocessed data has {data_channels} input channels but the plans and dataset.json declare "
            f"{expected_channels} ({channel_names}). Preprocess the data again with this dataset.json "
            f"(nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity), or fix dataset.json's "
            f"channel_names / the images' _0000.._{max(data_channels - 1, 0):04d} files.")


# ------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------------------------

class NonFiniteLossCounter:
    """Counts skipped steps: the total, their (epoch, iteration) and the current run of consecutive ones."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = int(max_consecutive)
        self.skipped: List[tuple] = []
        self.consecutive = 0

    def record(self, epoch: int, iteration: int) -> None:
        """Record a skipped step; raise NonFiniteLossError once ``max_consecutive`` happened in a row."""
        self.skipped.append((epoch, iteration))
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            first_epoch, first_iteration = self.skipped[-self.consecutive]
            raise NonFiniteLossError(
                f"Training stopped: {self.consecutive} consecutive non-finite (NaN/inf) losses, from epoch "
                f"{first_epoch} iteration {first_iteration} to epoch {epoch} iteration {iteration} "
                f"({len(self.skipped)} skipped steps in this run). The weights were not updated by these steps; "
                f"the last checkpoint_latest.pth is intact. Check the data for NaN/inf values, or try a lower "
                f"initial_lr or the NoAMP (fp32) variant of the trainer, then resume with --c.")

    def reset_run(self) -> None:
        """A finite step ends the current run of non-finite ones."""
        self.consecutive = 0


# ------------------------------------------------------------------------------------------------------------
# Out of GPU memory
# ------------------------------------------------------------------------------------------------------------

_TRIED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def out_of_memory_message(network: str, patch_size: Sequence[int], batch_size: int, error: BaseException,
                          device: Optional[torch.device] = None, step: str = "training") -> str:
    """Return the one message shown when a step of ``network`` runs out of GPU memory."""
    tried = _TRIED.search(str(error))
    needed = f"it tried to allocate {tried.group(1)} more" if tried else "the allocation size is unknown"
    had = ""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info(device)
            had = f"; {free / 2 ** 30:.2f} GiB of {total / 2 ** 30:.2f} GiB were free on {device}"
        except RuntimeError:
            pass
    return (f"Out of GPU memory in the {step} step of {network} (patch size {list(patch_size)}, batch size "
            f"{batch_size}): {needed}{had}. To fix: use a smaller patch or batch size in the plans (a memory-aware "
            f"plan: `nnunetv2_mamba plan --gpu-memory`), free the GPU from other processes; NoAMP (fp32) "
            f"variants need more memory than the default AMP trainers.")


def _guarded_forward(self, x, *args, **kwargs):
    try:
        return type(self).forward(self, x, *args, **kwargs)
    except MambaOutOfMemoryError:
        raise  # already reported by an inner plugin network
    except torch.cuda.OutOfMemoryError as error:
        step = "training" if self.training else "inference (validation or prediction)"
        raise MambaOutOfMemoryError(out_of_memory_message(type(self).__name__, tuple(x.shape[2:]), x.shape[0],
                                                          error, x.device, step)) from None


def guard_out_of_memory(network: nn.Module) -> nn.Module:
    """Make ``network``'s forward report torch.cuda.OutOfMemoryError as one MambaOutOfMemoryError.

    Needed at inference, where nnU-Net's predictor calls the network directly (the trainer also wraps its
    whole step, backward included). Only the instance's forward is rebound (a bound method, so copies of the
    network keep their own guard); parameters and state_dict keys are unchanged.
    """
    if "forward" not in vars(network):
        network.forward = types.MethodType(_guarded_forward, network)
    return network
