"""``nnunetv2_mamba plan``: planning with the memory estimate on the demo-sized synthetic dataset (CPU)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunetv2_mamba.data.synthetic import make_synthetic_dataset
from nnunetv2_mamba.planning.plan_cli import default_plans_name, find_trainer, next_commands, plan_for_gpu
from nnunetv2_mamba.trainers.umamba import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEncNoAMP
from tests.e2e.helpers import nnunet_command, nnunet_env, run_step

DATASET_ID = 981
TRAINER = "nnUNetTrainerUMambaBot"


def test_misspelled_trainer_names_the_closest_ones():
    with pytest.raises(ValueError, match="did you mean nnUNetTrainerUMambaEnc"):
        find_trainer("nnUNetTrainerUMambaEnk")
    with pytest.raises(ValueError, match="nnunetv2_mamba list"):
        find_trainer("xyz")


def test_default_plans_name_says_family_and_budget():
    assert default_plans_name(nnUNetTrainerUMambaBot, 24) == "nnUNetPlans_UMambaBot_24G"
    assert default_plans_name(nnUNetTrainerUMambaEncNoAMP, 10.5) == "nnUNetPlans_UMambaEncNoAMP_10p5G"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The demo-sized dataset, planned once by the CLI in a fresh process (fingerprint extracted by it)."""
    root = tmp_path_factory.mktemp("plan")
    env = nnunet_env(root)
    make_synthetic_dataset(Path(env["nnUNet_raw"]), DATASET_ID)
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "nnunetv2_mamba.cli", "plan", "-d", str(DATASET_ID), "-tr",
                                TRAINER, "--gpu-memory", "8", "-c", "3d_fullres"], env=env, capture_output=True,
                               text=True, timeout=600)
    seconds = time.perf_counter() - started
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"root": root, "env": env, "stdout": completed.stdout, "seconds": seconds}


@pytest.fixture()
def nnunet_paths(planned, monkeypatch):
    """Point nnU-Net at the test folders (nnU-Net 2.8 reads its path variables when they are used)."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, planned["env"][variable])
    return planned["env"]


def test_cli_writes_the_plans_and_prints_the_commands(planned):
    name = "nnUNetPlans_UMambaBot_8G"
    plans_file = Path(planned["env"]["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID:03d}_MambaSynthetic" / \
        f"{name}.json"
    plans = json.loads(plans_file.read_text())
    record = plans["nnunetv2_mamba_memory"]
    assert record["gpu_memory_gb"] == 8 and record["trainer"] == TRAINER
    assert list(plans["configurations"]) == ["3d_fullres"]
    assert record["estimates"]["3d_fullres"]["needed_gib"] <= 8
    assert f"Plans name (pass as -p): {name}" in planned["stdout"]
    assert f"nnUNetv2_preprocess -d {DATASET_ID} -plans_name {name} -c 3d_fullres" in planned["stdout"]
    assert f"nnUNetv2_train {DATASET_ID} 3d_fullres 0 -tr {TRAINER} -p {name}" in planned["stdout"]
    # Not asserted: a fresh process spends most of its time importing torch and nnU-Net and extracting the
    # fingerprint on a shared machine; the planning itself is timed in test_smaller_budget_...
    print(f"\nplan CLI (fresh process, fingerprint + planning): {planned['seconds']:.1f} s")


def _patch_times_batch(result):
    config = result["plans"]["configurations"]["3d_fullres"]
    product = 1
    for edge in config["patch_size"]:
        product *= edge
    return product * config["batch_size"]


def test_smaller_budget_never_gives_larger_patch_times_batch(nnunet_paths):
    started = time.perf_counter()
    budgets = (8.0, 1.2, 1.0, 0.9)  # the last ones below what the full patch needs (about 0.97 GB)
    results = [plan_for_gpu(str(DATASET_ID), TRAINER, budget, ["3d_fullres"], f"test_budget_{budget}")
               for budget in budgets]
    seconds = (time.perf_counter() - started) / len(results)
    sizes = [_patch_times_batch(result) for result in results]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > sizes[-1]  # the smallest budget does shrink the patch
    for budget, result in zip(budgets, results):
        assert result["plans"]["nnunetv2_mamba_memory"]["estimates"]["3d_fullres"]["needed_gib"] <= budget
    print(f"\nplanning (in-process, demo-sized dataset): {seconds:.1f} s per plan; needed GiB "
          f"{[r['plans']['nnunetv2_mamba_memory']['estimates']['3d_fullres']['needed_gib'] for r in results]}")
    assert seconds < 60


def test_too_small_budget_names_the_smallest_that_works(nnunet_paths):
    with pytest.raises(ValueError, match=r"too small .* Give --gpu-memory ([0-9.]+) or more") as error:
        plan_for_gpu(str(DATASET_ID), TRAINER, 0.5, ["3d_fullres"], "test_too_small")
    smallest = float(str(error.value).split("Give --gpu-memory ")[1].split()[0])
    assert smallest > 0.5
    result = plan_for_gpu(str(DATASET_ID), TRAINER, smallest, ["3d_fullres"], "test_smallest")
    assert result["plans"]["configurations"]["3d_fullres"]["batch_size"] >= 2
    plans_dir = Path(nnunet_paths["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID:03d}_MambaSynthetic"
    assert not (plans_dir / "test_too_small.json").exists()  # no half-written plans


def test_negative_budget_is_a_clear_error(nnunet_paths):
    with pytest.raises(ValueError, match="--gpu-memory -4 is not a positive size.*Give --gpu-memory"):
        plan_for_gpu(str(DATASET_ID), TRAINER, -4, ["3d_fullres"], "test_negative")


def test_plans_load_in_plans_manager_and_train(planned):
    """The plans file is what nnU-Net's own preprocess and train commands read; train 2 iterations on it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    env = planned["env"]
    name = "nnUNetPlans_UMambaBot_8G"
    plans_file = Path(env["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID:03d}_MambaSynthetic" / f"{name}.json"
    configuration = PlansManager(str(plans_file)).get_configuration("3d_fullres")
    plans = json.loads(plans_file.read_text())
    assert list(configuration.patch_size) == plans["configurations"]["3d_fullres"]["patch_size"]
    commands = next_commands({"dataset_name": f"Dataset{DATASET_ID:03d}_MambaSynthetic", "plans_name": name,
                              "plans": plans, "trainer": TRAINER})
    logs = planned["root"] / "logs"
    run_step("preprocess", [nnunet_command("nnUNetv2_preprocess"), *commands[0].split()[1:], "-np", "1"], env, logs)
    train = commands[1].split()
    train[train.index(TRAINER)] = f"{TRAINER}_tiny"
    run_step("train", [nnunet_command("nnUNetv2_train"), *train[1:], "-device", "cpu"],
             {**env, "nnUNet_n_proc_DA": "0"}, logs)
    results = Path(env["nnUNet_results"]) / f"Dataset{DATASET_ID:03d}_MambaSynthetic" / \
        f"{TRAINER}_tiny__{name}__3d_fullres" / "fold_0"
    assert (results / "checkpoint_final.pth").exists()
