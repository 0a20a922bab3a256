"""Short-schedule variants of every trainer: ``<Trainer>_1epoch``, ``_5epochs`` ... ``_250epochs``.

nnU-Net ships ``nnUNetTrainer_5epochs`` and friends for its own trainer only. For every concrete plugin trainer
``T`` this module makes ``T_<n>epochs``: a subclass of ``T`` that changes only ``num_epochs``. The schedules of
``T`` read ``self.num_epochs`` when the optimizer is configured, so they follow the new length on their own:

- nnU-Net's poly decay (U-Mamba, LoG-VMamba, the ``...NNUNetRecipe`` trainers) decays to 0 over n epochs;
- the Taming cosine (over the run) and OneCycle (10 % warm-up) and Vivim's cosine span n epochs;
- LoG-VMamba's PaperRecipe decays x0.1 at 70 % of n epochs (``lr_decay_fraction``).

The one schedule with an absolute length is the Taming reference's periodic cosine (``...PeriodicLR``:
T_max=100 epochs over 1000 or 300 epochs). "Scaled" here means the same shape over the shorter run:
T_max keeps its fraction of the run, ``T_max = round(100 * n / reference epochs)``, at least 1 epoch (SegMamba
1000 -> 50 epochs: T_max 5, five decays as in the reference; BiSegMamba 300 -> 50 epochs: T_max 17).

The classes are built on first use and stored as attributes of this module under their own name (with
``__module__`` and ``__qualname__`` set to match), so pickle, nnU-Net's lookup by name and a fresh process
(this module's ``__getattr__`` builds a variant asked for by name) all find the same class.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable

import torch

#: The epoch counts nnU-Net uses for its own short variants (nnUNetTrainer_5epochs, ...).
SHORT_EPOCHS = (1, 5, 10, 20, 50, 100, 250)
#: nnU-Net's default run length, for trainers that keep it.
NNUNET_DEFAULT_EPOCHS = 1000

_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<epochs>\d+)epochs?$")


def short_schedule_name(base_name: str, num_epochs: int) -> str:
    """Return nnU-Net's name for the variant: ``T_1epoch``, ``T_5epochs``, ..."""
    return f"{base_name}_{num_epochs}epoch{'' if num_epochs == 1 else 's'}"


def full_num_epochs(base: type) -> int:
    """Return the epochs of ``base``'s own schedule (its reference run, else nnU-Net's 1000)."""
    return int(getattr(base, "reference_num_epochs", NNUNET_DEFAULT_EPOCHS))


def scaled_cosine_t_max(base: type, num_epochs: int):
    """Return the periodic cosine's T_max for a run of ``num_epochs`` (None: the cosine spans the run)."""
    t_max = getattr(base, "cosine_t_max", None)
    if t_max is None:
        return None
    return max(1, int(round(t_max * num_epochs / full_num_epochs(base))))


def make_short_schedule_class(base: type, num_epochs: int) -> type:
    """Return (building once) the subclass of ``base`` that trains ``num_epochs`` epochs."""
    name = short_schedule_name(base.__name__, num_epochs)
    existing = globals().get(name)
    if existing is not None:
        if existing.__bases__ != (base,):
            raise RuntimeError(f"Two trainers produce the short-schedule name {name}; rename one of them.")
        return existing

    # nnU-Net records the constructor's arguments by inspecting its signature: keep it explicit.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs

    attributes = {
        "__init__": __init__,
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} trained for {num_epochs} epoch{'' if num_epochs == 1 else 's'} "
                   f"(schedule scaled to the run; see nnunetv2_mamba.trainers.schedules).",
        "short_schedule_of": base,
        "short_schedule_epochs": num_epochs,
    }
    t_max = scaled_cosine_t_max(base, num_epochs)
    if t_max is not None:
        attributes["cosine_t_max"] = t_max
    cls = type(name, (base,), attributes)
    globals()[name] = cls
    return cls


def make_short_schedule_classes(bases: Iterable[type]) -> Dict[str, type]:
    """Return {name: class} of every short variant of every class in ``bases``."""
    found = {}
    for base in bases:
        for num_epochs in SHORT_EPOCHS:
            cls = make_short_schedule_class(base, num_epochs)
            found[cls.__name__] = cls
    return found


def __getattr__(name: str):
    # A fresh process (an unpickler, a DDP worker) asks for a variant before anything built it.
    match = _SUFFIX.match(name)
    if match is None or int(match["epochs"]) not in SHORT_EPOCHS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from nnunetv2_mamba.trainers.discovery import concrete_trainers

    bases = dict(concrete_trainers())
    if match["base"] not in bases or short_schedule_name(match["base"], int(match["epochs"])) != name:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return make_short_schedule_class(bases[match["base"]], int(match["epochs"]))
