"""Trainer discovery: make nnU-Net's ``nnUNet_extTrainer`` lookup see this plugin's trainers.

nnunetv2 >= 2.8 searches the folders listed in ``nnUNet_extTrainer`` (os.pathsep-separated) for a trainer
it does not ship. ``register_trainer_path`` appends our folder to that variable, keeping the user's folders
first. It runs at every interpreter start through the installed ``nnunetv2_mamba.pth`` hook (so console
scripts, DDP workers and user scripts all see it) and again whenever ``nnunetv2_mamba`` is imported.
This module imports nothing but ``os``: it runs at start-up of every Python process.
"""
import os

EXT_TRAINER_ENV_VAR = "nnUNet_extTrainer"
# The folder holds a single module, ``nnunetv2_mamba_trainers``, re-exporting every trainer class; nnU-Net
# imports modules of such folders as top-level modules, so the name must be unique, and the classes
# themselves stay defined in ``nnunetv2_mamba.trainers.*``.
TRAINER_SEARCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def register_trainer_path(environ=None) -> bool:
    """Append our trainer folder to $nnUNet_extTrainer unless present; return True if it was added."""
    environ = os.environ if environ is None else environ
    current = environ.get(EXT_TRAINER_ENV_VAR, "")
    folders = [folder for folder in current.split(os.pathsep) if folder.strip()]
    if any(os.path.abspath(folder) == TRAINER_SEARCH_DIR for folder in folders):
        return False
    environ[EXT_TRAINER_ENV_VAR] = os.pathsep.join(folders + [TRAINER_SEARCH_DIR])
    return True
