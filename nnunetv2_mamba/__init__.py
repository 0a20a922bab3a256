"""nnunetv2-mamba: Mamba segmentation networks as nnU-Net v2 trainers.

Importing the package is cheap (no torch import): the start-up hook imports it in every Python process.
"""
import os as _os
import sys as _sys

from nnunetv2_mamba.registration import register_trainer_path
from nnunetv2_mamba.version import __version__

# Source checkouts. ``trainers/`` and ``network_architectures/`` sit next to this folder; setup.py maps them
# to nnunetv2_mamba.trainers / .network_architectures when it installs (a regular install copies them into
# this folder, an editable one maps them with setuptools' finder). When this package is imported straight
# from a checkout (``PYTHONPATH=<checkout> pytest``, or pytest run from the root, where the checkout's
# folder shadows an installed copy), the same two names must resolve to the same two folders.
#
# Why not append the checkout root to ``__path__``: the root holds this very folder, setup.py and tests/,
# so ``nnunetv2_mamba.nnunetv2_mamba``, ``.setup`` and ``.tests`` became importable and
# ``pkgutil.walk_packages`` (doc generators, ``pytest --pyargs``, recursive class finders such as nnU-Net's)
# recursed through ``nnunetv2_mamba.nnunetv2_mamba.nnunetv2_mamba...`` until RecursionError.
#
# Instead ``__path__`` gets one extra entry, a marker string that is not a directory. A path hook turns
# exactly that entry into a finder that knows the two subpackage folders and nothing else. A path entry
# rather than a meta-path finder, because both the import system (PathFinder walks ``__path__``) and
# ``pkgutil.iter_modules`` (which asks a path entry's finder for ``iter_modules``) then see the two
# subpackages, so ``walk_packages`` yields the modules of the three folders: the same names as an
# installed copy. Nothing is imported until asked for (the subpackages import torch; start-up stays cheap).
#: Subpackages whose folders sit next to this one in a checkout (folder name = subpackage name, as in setup.py).
_CHECKOUT_SUBPACKAGES = ("trainers", "network_architectures")


class _CheckoutSubpackageFinder:
    """Path entry finder for ``nnunetv2_mamba.trainers`` / ``.network_architectures`` in a source checkout."""

    def __init__(self, checkout_root):
        self.locations = {f"{__name__}.{name}": _os.path.join(checkout_root, name) for name in _CHECKOUT_SUBPACKAGES}

    def find_spec(self, fullname, target=None):
        import importlib.util

        location = self.locations.get(fullname)
        if location is None:
            return None
        return importlib.util.spec_from_file_location(fullname, _os.path.join(location, "__init__.py"),
                                                      submodule_search_locations=[location])

    def invalidate_caches(self):
        pass

    def iter_modules(self, prefix=""):
        """Yield (name, is_package) of the two subpackages; ``pkgutil.iter_modules`` calls this."""
        for fullname in self.locations:
            yield prefix + fullname.rpartition(".")[2], True


def _source_checkout_root():
    """Return the checkout root if this package is imported from a source checkout, else None."""
    package_dir = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(package_dir)
    in_checkout = (_os.path.isfile(_os.path.join(root, "setup.py"))
                   and all(_os.path.isfile(_os.path.join(root, name, "__init__.py")) for name in _CHECKOUT_SUBPACKAGES))
    installed = any(_os.path.isdir(_os.path.join(package_dir, name)) for name in _CHECKOUT_SUBPACKAGES)
    return root if in_checkout and not installed else None


def _add_checkout_subpackages(root):
    """Append the marker entry to ``__path__`` and register the path hook that serves it (idempotent)."""
    marker = _os.path.join(root, "__nnunetv2_mamba_subpackages__")
    finder = _CheckoutSubpackageFinder(root)

    def checkout_subpackages_hook(entry):
        if entry != marker:
            raise ImportError("not the nnunetv2_mamba checkout marker")
        return finder

    checkout_subpackages_hook.nnunetv2_mamba_marker = marker
    if not any(getattr(hook, "nnunetv2_mamba_marker", None) == marker for hook in _sys.path_hooks):
        # First, so that the marker never reaches the other hooks (zipimport would try to open it).
        _sys.path_hooks.insert(0, checkout_subpackages_hook)
    _sys.path_importer_cache.pop(marker, None)
    if marker not in __path__:
        __path__.append(marker)


_root = _source_checkout_root()
if _root is not None:
    _add_checkout_subpackages(_root)
del _root

register_trainer_path()

__all__ = ["__version__", "register_trainer_path"]
