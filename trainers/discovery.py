"""Find the plugin's trainer classes; a module that fails to import is logged and skipped."""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from typing import Dict, List, Tuple

logger = logging.getLogger(__name__)

_PACKAGE = "nnunetv2_mamba.trainers"
_NOT_TRAINER_MODULES = {"base", "discovery", "schedules"}


def trainer_module_names() -> List[str]:
    """Return the dotted names of the modules in nnunetv2_mamba.trainers that define trainers."""
    package = importlib.import_module(_PACKAGE)
    return [f"{_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
            if not info.ispkg and info.name not in _NOT_TRAINER_MODULES and not info.name.startswith("_")]


def load_trainer_classes(errors: Dict[str, str] | None = None) -> Dict[str, type]:
    """Return {class name: class} of every trainer: those of the trainer modules and their short schedules.

    The short-schedule variants (``T_5epochs`` ..., see schedules.py) of every concrete trainer are included,
    so nnU-Net's lookup by name finds them. Import failures are logged (and recorded in ``errors`` by module name) instead of raised, so one
    broken module never hides the others from nnU-Net's lookup.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_mamba.trainers import base
    from nnunetv2_mamba.trainers.schedules import make_short_schedule_classes

    found: Dict[str, type] = {cls.__name__: cls for cls in (base.nnUNetTrainerMambaBase,)}
    for module_name in trainer_module_names():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # keep looking: one optional dependency must not hide all trainers
            logger.warning("nnunetv2_mamba: could not import trainer module %s (%s: %s); its trainers are "
                           "unavailable.", module_name, type(error).__name__, error)
            if errors is not None:
                errors[module_name] = f"{type(error).__name__}: {error}"
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__:
                found[name] = obj
    found.update(make_short_schedule_classes(cls for _, cls in concrete_of(found)))
    return found


def concrete_of(classes: Dict[str, type]) -> List[Tuple[str, type]]:
    """Return (name, class) of the concrete trainers in ``classes``, short-schedule variants left out."""
    return sorted((name, cls) for name, cls in classes.items()
                  if getattr(cls, "is_concrete", False) and "short_schedule_of" not in vars(cls))


def concrete_trainers() -> List[Tuple[str, type]]:
    """Return (name, class) of the trainers users can train, sorted by name (short schedules left out)."""
    return concrete_of(load_trainer_classes())


def short_schedule_trainers() -> List[Tuple[str, type]]:
    """Return (name, class) of the short-schedule variants (``T_1epoch`` ... ``T_250epochs``), sorted by name."""
    return sorted((name, cls) for name, cls in load_trainer_classes().items() if "short_schedule_of" in vars(cls))
