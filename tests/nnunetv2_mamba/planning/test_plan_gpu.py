"""GPU (issue 15): plans made for 24 and 40 GB train 20 fp16-AMP steps within that memory, one trainer per family.

For every 3D network family: ``nnunetv2_mamba plan --gpu-memory 24`` and ``40`` on a dataset of large volumes
(so that nnU-Net's median-shape cap does not stop the patch from growing), then 20 steps of
``nnUNetv2_train -tr <Trainer>_memcheck -p <plans>`` with the process's GPU memory capped at the budget
(``torch.cuda.set_per_process_memory_fraction``, tests/e2e/trainers). The recipe variants of a family
(NNUNetRecipe, PeriodicLR, PaperRecipe) build the same network from the same plan, so one trainer per family
stands for them; Vivim plans video configurations and is not planned by ``nnunetv2_mamba plan``.

The preprocessed data of every plan is nnU-Net's default one (same spacing, normalisation and cropping; only patch
and batch differ), so the test links it instead of running ``nnUNetv2_preprocess`` once per plan.

The (trainer, budget) runs are independent processes, each capped at its own budget, so they may share one large GPU:
``$NNUNETV2_MAMBA_TEST_CONCURRENT_GB`` (default 0: one at a time) lets runs start while the budgets of those running
add up to at most that many GB. ``$NNUNETV2_MAMBA_TEST_PLAN_BUDGETS`` (default "24,40") narrows the budgets run, for a
device call that finishes one budget left by an earlier call; the 40 GB > 24 GB comparison needs both.
"""
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

DATASET_ID = 984
BUDGETS_GB = tuple(int(gb) for gb in os.environ.get("NNUNETV2_MAMBA_TEST_PLAN_BUDGETS", "24,40").split(","))
FAMILY_TRAINERS = ["nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc", "nnUNetTrainerLoGVMamba",
                   "nnUNetTrainerSegMamba", "nnUNetTrainerBiSegMamba", "nnUNetTrainerSegMambaSkip",
                   "nnUNetTrainerMultiSegMamba"]


@pytest.fixture(scope="module")
def large_dataset(tmp_path_factory):
    """nnU-Net's raw + default-preprocessed dataset of five 288^3 volumes; $NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT keeps
    it in that folder and reuses it when a finished one is there (a device session's earlier call prepares it
    while the GPU does other work)."""
    from nnunetv2_mamba.data.synthetic import make_synthetic_dataset
    from tests.e2e.helpers import nnunet_command, nnunet_env, run_step

    kept = os.environ.get("NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT")
    root = Path(kept) if kept else tmp_path_factory.mktemp("plan_gpu")
    env = nnunet_env(root)
    finished = root / "prepared.ok"
    if not finished.exists():
        make_synthetic_dataset(Path(env["nnUNet_raw"]), DATASET_ID, shape=(288, 288, 288), n_train=5, n_test=0)
        run_step("plan_and_preprocess", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                                         "-c", "3d_fullres", "-np", "8"], env, root / "logs", timeout=1800)
        finished.touch()
    return root, env


def test_large_dataset_prepared_for_the_plans(large_dataset):
    """The fixture's dataset: nnU-Net's default 3d_fullres plans and five preprocessed cases (also the way a device
    session prepares it ahead: ``-k prepared``)."""
    root, env = large_dataset
    preprocessed = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    assert max(plans["configurations"]["3d_fullres"]["patch_size"]) <= 288
    assert len(list((preprocessed / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == 5


def _plan(trainer_name, budget_gb, root, env) -> dict:
    """Run ``nnunetv2_mamba plan`` for the budget; return the plans (preprocessed data linked to nnU-Net's)."""
    from tests.e2e.helpers import run_step

    plans_name = f"test_{trainer_name}_{budget_gb}G"
    run_step(f"plan_{plans_name}", [sys.executable, "-m", "nnunetv2_mamba.cli", "plan", "-d", str(DATASET_ID),
                                    "-tr", trainer_name, "--gpu-memory", str(budget_gb), "-c", "3d_fullres",
                                    "--plans-name", plans_name], env, root / "logs")
    preprocessed = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    plans = json.loads((preprocessed / f"{plans_name}.json").read_text())
    data = preprocessed / plans["configurations"]["3d_fullres"]["data_identifier"]
    if not data.exists():  # same preprocessing as nnU-Net's default plans (see the module docstring)
        os.symlink(preprocessed / "nnUNetPlans_3d_fullres", data)
    return plans


def _train(trainer_name, budget_gb, plans, root, env) -> dict:
    """Train 20 steps of ``<trainer>_memcheck`` capped at the budget; return memory_check.json + the estimate."""
    from tests.e2e.helpers import nnunet_command, run_step

    plans_name = plans["plans_name"]
    run_step(f"train_{plans_name}", [nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr",
                                     f"{trainer_name}_memcheck", "-p", plans_name, "-device", "cuda"],
             {**env, "NNUNETV2_MAMBA_TEST_GPU_MEMORY_GB": str(budget_gb),
              "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "6")},
             root / "logs", timeout=1800)
    fold = next(Path(env["nnUNet_results"]).glob(f"Dataset{DATASET_ID}_*/{trainer_name}_memcheck__{plans_name}__"
                                                 "3d_fullres/fold_0"))
    record = json.loads((fold / "memory_check.json").read_text())
    record["estimate"] = plans["nnunetv2_mamba_memory"]["estimates"]["3d_fullres"]
    return record


@pytest.fixture(scope="module")
def memcheck_records(request, large_dataset):
    """{(trainer, budget): record or the exception it raised} for the trainers of the selected tests (``-k``), the
    runs scheduled by their GPU budgets."""
    root, env = large_dataset
    selected = {item.callspec.params["trainer_name"] for item in request.session.items
                if "trainer_name" in getattr(getattr(item, "callspec", None), "params", {})}
    capacity = float(os.environ.get("NNUNETV2_MAMBA_TEST_CONCURRENT_GB", "0"))
    in_use = [0.0]
    room = threading.Condition()

    planners = threading.Semaphore(4 if capacity else 1)  # planning is CPU work: a few at a time

    def run(job):
        trainer_name, budget = job
        try:
            with planners:
                plans = _plan(trainer_name, budget, root, env)
        except Exception as error:  # reported by that trainer's test, the other runs go on
            return error
        with room:  # a training starts alone or while the running budgets leave room for it
            room.wait_for(lambda: in_use[0] == 0 or in_use[0] + budget <= capacity)
            in_use[0] += budget
        try:
            record = _train(trainer_name, budget, plans, root, env)
            print(f"finished {trainer_name} {budget} GB: {json.dumps(record)}", flush=True)
            return record
        except Exception as error:
            return error
        finally:
            with room:
                in_use[0] -= budget
                room.notify_all()

    # largest budgets first, so that the small ones fill the gaps
    jobs = sorted(((name, budget) for name in FAMILY_TRAINERS if name in selected for budget in BUDGETS_GB),
                  key=lambda job: -job[1])
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return dict(zip(jobs, pool.map(run, jobs)))


@pytest.mark.parametrize("trainer_name", FAMILY_TRAINERS)
def test_24_and_40_gb_plans_train_within_their_budget(trainer_name, memcheck_records):
    records = {budget: memcheck_records[(trainer_name, budget)] for budget in BUDGETS_GB}
    for budget, record in records.items():
        if isinstance(record, Exception):
            raise record
    for budget, record in records.items():
        print(f"{trainer_name} {budget} GB: patch {record['patch_size']} batch {record['batch_size']}, peak "
              f"allocated {record['peak_allocated_gib']:.2f} GiB (estimate {record['estimate']['peak_allocated_gib']}"
              f" GiB), reserved {record['peak_reserved_gib']:.2f} GiB")
        assert record["peak_reserved_gib"] <= budget  # the cap would have raised out-of-memory otherwise

    def voxels_times_batch(record):
        product = record["batch_size"]
        for edge in record["patch_size"]:
            product *= edge
        return product

    if len(records) > 1:
        assert voxels_times_batch(records[max(records)]) > voxels_times_batch(records[min(records)]), records
