"""Test-only trainers: ``<Trainer>_tiny`` for every concrete nnunetv2-mamba trainer.

This folder is put on ``nnUNet_extTrainer`` by the end-to-end tests (next to the plugin's own folder, which
also checks that a user's value is kept). Each tiny trainer trains 1 epoch of 2 iterations with 1 validation
iteration, so nnU-Net's real commands run in seconds; the real trainers are unchanged.
"""
import torch

from nnunetv2_mamba.trainers.discovery import concrete_trainers

TINY_SCHEDULE = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}


def _make_tiny(base: type) -> type:
    # nnU-Net records the constructor's arguments by inspecting its signature: keep it explicit.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for attribute, value in TINY_SCHEDULE.items():
            setattr(self, attribute, value)

    return type(f"{base.__name__}_tiny", (base,), {"__init__": __init__, "__module__": __name__})


for _name, _cls in concrete_trainers():
    globals()[f"{_name}_tiny"] = _make_tiny(_cls)
