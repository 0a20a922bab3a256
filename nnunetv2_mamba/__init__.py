"""nnunetv2-mamba: Mamba segmentation networks as nnU-Net v2 trainers.

Importing the package is cheap (no torch import): the start-up hook imports it in every Python process.
"""
from nnunetv2_mamba.registration import register_trainer_path
from nnunetv2_mamba.version import __version__

register_trainer_path()

__all__ = ["__version__", "register_trainer_path"]
