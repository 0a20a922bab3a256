"""Test-only trainers: ``<Trainer>_tiny`` for every concrete nnunetv2-mamba trainer.

This folder is put on ``nnUNet_extTrainer`` by the end-to-end tests (next to the plugin's own folder, which
also checks that a user's value is kept). Each tiny trainer trains 1 epoch of 2 iterations with 1 validation
iteration, so nnU-Net's real commands run in seconds; the real trainers are unchanged.
"""
import os

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


class nnUNetTrainerUMambaBot_resume(globals()["nnUNetTrainerUMambaBot_tiny"]):
    """3 epochs of 2 iterations, checkpoint_latest.pth after every epoch, no final validation: a run to kill
    and resume (--c)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.save_every = 3, 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Validation skipped (test trainer)")


def _make_amp_run(base: type) -> type:
    """``<Trainer>_amp``: one epoch of $NNUNETV2_MAMBA_TEST_ITERATIONS (default 500) steps at the trainer's
    default precision, no final validation (the GPU mixed-precision test counts skipped non-finite steps)."""
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_val_iterations_per_epoch = 1, 1
        self.num_iterations_per_epoch = int(os.environ.get("NNUNETV2_MAMBA_TEST_ITERATIONS", "500"))

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Validation skipped (test trainer)")

    return type(f"{base.__name__}_amp", (base,), {"__init__": __init__, "__module__": __name__,
                                                  "perform_actual_validation": perform_actual_validation})


for _name, _cls in concrete_trainers():
    globals()[f"{_name}_amp"] = _make_amp_run(_cls)
