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


def _skip_final_validation(self, save_probabilities: bool = False):
    """Replaces nnU-Net's validation after training in the test trainers that do not need it."""
    self.print_to_log_file("Validation skipped (test trainer)")


class nnUNetTrainerUMambaBot_resume(globals()["nnUNetTrainerUMambaBot_tiny"]):
    """3 epochs of 2 iterations, checkpoint_latest.pth after every epoch, no final validation: a run to kill
    and resume (--c)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.save_every = 3, 1

    perform_actual_validation = _skip_final_validation


def _make_amp_run(base: type) -> type:
    """``<Trainer>_amp``: one epoch of $NNUNETV2_MAMBA_TEST_ITERATIONS (default 500) steps at the trainer's
    default precision, no final validation (the GPU mixed-precision test counts skipped non-finite steps)."""
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_val_iterations_per_epoch = 1, 1
        self.num_iterations_per_epoch = int(os.environ.get("NNUNETV2_MAMBA_TEST_ITERATIONS", "500"))

    return type(f"{base.__name__}_amp", (base,), {"__init__": __init__, "__module__": __name__,
                                                  "perform_actual_validation": _skip_final_validation})


for _name, _cls in concrete_trainers():
    globals()[f"{_name}_amp"] = _make_amp_run(_cls)


def _make_memory_check(base: type) -> type:
    """``<Trainer>_memcheck``: 20 training steps with the process's GPU memory capped at
    $NNUNETV2_MAMBA_TEST_GPU_MEMORY_GB (``torch.cuda.set_per_process_memory_fraction``), no final validation;
    writes the peak allocated/reserved memory to ``memory_check.json`` in the fold folder (issue 15's check that a
    plan made for that budget trains within it)."""
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 20, 1

    def on_train_start(self):
        budget_gib = float(os.environ["NNUNETV2_MAMBA_TEST_GPU_MEMORY_GB"])
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2 ** 30 / total), self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base.on_train_start(self)

    def on_train_end(self):
        import json

        record = {"budget_gib": float(os.environ["NNUNETV2_MAMBA_TEST_GPU_MEMORY_GB"]),
                  "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2 ** 30,
                  "patch_size": list(self.configuration_manager.patch_size),
                  "batch_size": self.configuration_manager.batch_size}
        with open(os.path.join(self.output_folder, "memory_check.json"), "w") as handle:
            json.dump(record, handle)
        base.on_train_end(self)

    return type(f"{base.__name__}_memcheck", (base,), {
        "__init__": __init__, "__module__": __name__, "on_train_start": on_train_start,
        "on_train_end": on_train_end, "perform_actual_validation": _skip_final_validation})


for _name, _cls in concrete_trainers():
    globals()[f"{_name}_memcheck"] = _make_memory_check(_cls)
