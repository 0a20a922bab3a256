"""Every nnunetv2-mamba trainer class, re-exported for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports this file as a top-level module and looks the requested class name up in it. A trainer
module that fails to import (a missing optional dependency, say) is logged and skipped, so the other
trainers are still found.
"""
from nnunetv2_mamba.trainers.discovery import load_trainer_classes

globals().update(load_trainer_classes())
