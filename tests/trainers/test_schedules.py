"""Short-schedule trainers: nnU-Net finds T_1epoch ... T_250epochs by name, they set the epochs, the recipes scale."""
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.registration import EXT_TRAINER_ENV_VAR, TRAINER_SEARCH_DIR
from nnunetv2_mamba.trainers import discovery, schedules

VARIANT_SUFFIXES = ("_1epoch", "_5epochs", "_10epochs", "_20epochs", "_50epochs", "_100epochs", "_250epochs")


def test_every_concrete_trainer_has_every_short_schedule_and_nothing_else_changes():
    concrete = dict(discovery.concrete_trainers())
    short = dict(discovery.short_schedule_trainers())
    assert len(short) == len(concrete) * len(VARIANT_SUFFIXES)
    for name, base in concrete.items():
        for suffix, epochs in zip(VARIANT_SUFFIXES, schedules.SHORT_EPOCHS):
            cls = short[name + suffix]
            assert cls.__bases__ == (base,) and cls.short_schedule_epochs == epochs
            assert cls.__module__ == "nnunetv2_mamba.trainers.schedules" and cls.__qualname__ == cls.__name__
            assert getattr(schedules, cls.__name__) is cls
            changed = set(vars(cls)) - {"__init__", "__module__", "__qualname__", "__doc__", "short_schedule_of",
                                        "short_schedule_epochs", "cosine_t_max"}
            assert changed == set(), (cls.__name__, changed)
            assert pickle.loads(pickle.dumps(cls)) is cls


def test_nnunet_finds_short_schedules_by_name_in_a_fresh_process():
    names = ["nnUNetTrainerUMambaBot_5epochs", "nnUNetTrainerLoGVMambaPaperRecipe_1epoch",
             "nnUNetTrainerSegMambaPeriodicLR_250epochs", "nnUNetTrainerVivim_20epochs"]
    snippet = ("import sys, contextlib, io\n"
               "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
               "for name in sys.argv[1:]:\n"
               "    with contextlib.redirect_stdout(io.StringIO()):\n"
               "        cls = find(name)\n"
               "    print(cls.__module__, cls.__name__, cls.short_schedule_epochs, cls.__bases__[0].__name__)\n")
    env = dict(os.environ, **{EXT_TRAINER_ENV_VAR: TRAINER_SEARCH_DIR})
    completed = subprocess.run([sys.executable, "-c", snippet, *names], capture_output=True, text=True, env=env,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr
    rows = [line.split() for line in completed.stdout.strip().splitlines()]
    assert rows == [["nnunetv2_mamba.trainers.schedules", name, name.rsplit("_", 1)[1].rstrip("epochs") or "1",
                     name.rsplit("_", 1)[0]] for name in names]


def test_a_fresh_process_unpickles_a_variant_before_anything_built_it():
    payload = pickle.dumps(schedules.make_short_schedule_class(dict(discovery.concrete_trainers())[
        "nnUNetTrainerUMambaEnc"], 10))
    snippet = "import pickle, sys\ncls = pickle.loads(sys.stdin.buffer.read())\nprint(cls.__name__, cls.__mro__[1].__name__)"
    completed = subprocess.run([sys.executable, "-c", snippet], input=payload, capture_output=True, timeout=600)
    assert completed.returncode == 0, completed.stderr.decode()
    assert completed.stdout.decode().split() == ["nnUNetTrainerUMambaEnc_10epochs", "nnUNetTrainerUMambaEnc"]


def test_unknown_names_are_attribute_errors():
    for name in ("nnUNetTrainerUMambaBot_7epochs", "nnUNetTrainerNoSuchThing_5epochs", "nnUNetTrainerUMambaBot_5epoch"):
        with pytest.raises(AttributeError):
            getattr(schedules, name)


@pytest.fixture
def light_trainer_init(monkeypatch):
    """Replace nnUNetTrainer.__init__ by the defaults it sets (no plans, folders or dataset needed)."""
    def fake_init(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        self.initial_lr, self.weight_decay, self.num_epochs = 1e-2, 3e-5, 1000
        self.device = device

    monkeypatch.setattr(nnUNetTrainer, "__init__", fake_init)


def _learning_rates(name: str, epochs):
    trainer = dict(discovery.short_schedule_trainers())[name](None, "3d_fullres", 0, None, torch.device("cpu"))
    trainer.network = torch.nn.Linear(2, 2)
    optimizer, scheduler = trainer.configure_optimizers()
    rates = []
    for epoch in epochs:
        scheduler.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return trainer, rates


def test_poly_schedule_spans_the_short_run(light_trainer_init):
    trainer, rates = _learning_rates("nnUNetTrainerUMambaBot_10epochs", [0, 5, 9])
    assert trainer.num_epochs == 10
    assert rates == pytest.approx([1e-2, 1e-2 * 0.5 ** 0.9, 1e-2 * 0.1 ** 0.9])


def test_paper_recipe_milestone_is_at_70_percent_of_the_short_run(light_trainer_init):
    trainer, rates = _learning_rates("nnUNetTrainerLoGVMambaPaperRecipe_20epochs", [0, 13, 14, 19])
    assert trainer.num_epochs == 20 and trainer.lr_decay_milestone() == 14
    assert rates == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])


def test_taming_cosine_and_one_cycle_span_the_short_run(light_trainer_init):
    trainer, rates = _learning_rates("nnUNetTrainerSegMamba_50epochs", [0, 25, 50])
    assert trainer.num_epochs == 50
    assert rates == pytest.approx([3e-4, 5e-6 + (3e-4 - 5e-6) / 2, 5e-6])
    trainer, rates = _learning_rates("nnUNetTrainerMultiSegMamba_100epochs", [0, 9, 99])
    assert trainer.num_epochs == 100
    assert rates == pytest.approx([3e-4 / 25, 3e-4, 3e-4 / 25 / 1e8])  # peak at 10 % of the run


def test_periodic_cosine_keeps_its_fraction_of_the_run(light_trainer_init):
    # SegMamba: T_max 100 of 1000 epochs -> 5 of 50; BiSegMamba: 100 of 300 -> round(16.7) = 17 of 50.
    trainer, rates = _learning_rates("nnUNetTrainerSegMambaPeriodicLR_50epochs", [0, 5, 10, 45])
    assert trainer.cosine_t_max == 5 and trainer.num_epochs == 50
    assert rates == pytest.approx([3e-4, 5e-6, 3e-4, 5e-6])
    assert dict(discovery.short_schedule_trainers())["nnUNetTrainerBiSegMambaPeriodicLR_50epochs"].cosine_t_max == 17
    assert dict(discovery.short_schedule_trainers())["nnUNetTrainerSegMambaPeriodicLR_1epoch"].cosine_t_max == 1
    assert dict(discovery.concrete_trainers())["nnUNetTrainerSegMambaPeriodicLR"].cosine_t_max == 100


def test_every_non_video_variant_sets_its_epochs(light_trainer_init):
    for name, cls in discovery.short_schedule_trainers():
        if "Vivim" in name:  # Vivim's __init__ needs real plans; it inherits the same __init__ wrapper
            continue
        assert cls(None, "3d_fullres", 0, None, torch.device("cpu")).num_epochs == cls.short_schedule_epochs, name
