"""nnunetv2-mamba: Mamba segmentation networks as nnU-Net v2 trainers.

Importing the package is cheap (no torch import): the start-up hook imports it in every Python process.
"""
import os as _os

from nnunetv2_mamba.registration import register_trainer_path
from nnunetv2_mamba.version import __version__

# In a source checkout, ``trainers/`` and ``network_architectures/`` sit next to this folder (setup.py maps
# them to nnunetv2_mamba.trainers / .network_architectures when installing). When this package is imported
# straight from the checkout (tests run from the repository root), search the checkout root for subpackages
# too, so the same import names work there.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_checkout_root, "setup.py"))
        and _os.path.isfile(_os.path.join(_checkout_root, "trainers", "__init__.py"))
        and not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "trainers"))):
    __path__.append(_checkout_root)

register_trainer_path()

__all__ = ["__version__", "register_trainer_path"]
