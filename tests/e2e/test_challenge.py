"""A challenge workflow end to end on the CPU: region-based training with one of our trainers, evaluation on the
regions, ``nnunetv2_mamba compare`` on nnU-Net's real summary.json, the export-zip / install round trip
predicting the same segmentation, then find_best_configuration, ensemble and postprocessing into a submission
folder (slow: several minutes on two cores)."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_mamba.data.synthetic import make_synthetic_dataset
from tests.e2e.helpers import nnunet_command, nnunet_env, run_step

DATASET_ID = 957
TRAINER = "nnUNetTrainerUMambaBot_tiny"  # 1 epoch x 2 iterations (tests/e2e/trainers)
CONFIGURATION = "3d_fullres"
# Region-based labels: "object" joins the sphere (1) and the box (2); "box" is the box alone.
REGION_LABELS = {"background": 0, "object": [1, 2], "box": [2]}


def predict(env, images, output, logs, step):
    run_step(step, [nnunet_command("nnUNetv2_predict"), "-i", str(images), "-o", str(output), "-d", str(DATASET_ID),
                    "-c", CONFIGURATION, "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
                    "--disable_progress_bar", "--save_probabilities"], env, logs)
    return {path.name: sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in sorted(output.glob("*.nii.gz"))}


@pytest.mark.e2e
def test_region_training_compare_and_export_install_round_trip(tmp_path):
    env = nnunet_env(tmp_path)
    logs = tmp_path / "logs"
    dataset = make_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, name="MambaRegions", shape=(16, 16, 16))
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    dataset_json.update(labels=REGION_LABELS, regions_class_order=[1, 2])
    (dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=2))

    run_step("plan_and_preprocess", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
                                     CONFIGURATION, "-np", "1", "--verify_dataset_integrity"], env, logs)
    run_step("train", [nnunet_command("nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, "0", "-tr", TRAINER,
                       "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"}, logs)
    model = next((tmp_path / "nnUNet_results").glob(f"Dataset{DATASET_ID}_*")) / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    validation = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert set(validation["mean"]) == {"(1, 2)", "(2,)"}  # nnU-Net evaluated the regions, not the labels

    predictions = predict(env, dataset / "imagesTs", tmp_path / "predicted", logs, "predict")
    assert len(predictions) == 2 and all(set(np.unique(seg)) <= {0, 1, 2} for seg in predictions.values())
    run_step("evaluate", [nnunet_command("nnUNetv2_evaluate_folder"), str(dataset / "labelsTs"),
                          str(tmp_path / "predicted"), "-djfile", str(model / "dataset.json"), "-pfile",
                          str(model / "plans.json"), "-np", "1"], env, logs)
    test_summary = json.loads((tmp_path / "predicted" / "summary.json").read_text())
    assert set(test_summary["mean"]) == {"(1, 2)", "(2,)"}
    assert all(0.0 <= test_summary["mean"][key]["Dice"] <= 1.0 for key in test_summary["mean"])

    completed = subprocess.run([sys.executable, "-m", "nnunetv2_mamba.cli", "compare", "-d", str(DATASET_ID), "-c",
                                CONFIGURATION, "-tr", TRAINER, "-f", "0", "-o", str(tmp_path / "compare")],
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "compare" / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["label"], row["name"]) for row in rows] == [("(1, 2)", "object"), ("(2,)", "box")]
    n_validation = len(validation["metric_per_case"])
    for row in rows:
        finite = [case["metrics"][row["label"]]["Dice"] for case in validation["metric_per_case"]
                  if not math.isnan(case["metrics"][row["label"]]["Dice"])]  # nnU-Net writes NaN as NaN
        assert int(row["n_cases"]) == len(finite) <= n_validation
        assert float(row["mean_dice"]) == pytest.approx(validation["mean"][row["label"]]["Dice"])

    archive = tmp_path / "model.zip"
    run_step("export", [nnunet_command("nnUNetv2_export_model_to_zip"), "-d", str(DATASET_ID), "-o", str(archive),
                        "-c", CONFIGURATION, "-tr", TRAINER, "-f", "0"], env, logs)
    other_machine = {**env, "nnUNet_results": str(tmp_path / "other_machine_results")}
    (tmp_path / "other_machine_results").mkdir()
    run_step("install", [nnunet_command("nnUNetv2_install_pretrained_model_from_zip"), str(archive)],
             other_machine, logs)
    installed = next((tmp_path / "other_machine_results").glob(f"Dataset{DATASET_ID}_*"))
    assert (installed / model.name / "fold_0" / "checkpoint_final.pth").is_file()
    reinstalled = predict(other_machine, dataset / "imagesTs", tmp_path / "predicted_installed", logs,
                          "predict_installed")
    assert reinstalled.keys() == predictions.keys()
    for name, segmentation in predictions.items():
        np.testing.assert_array_equal(reinstalled[name], segmentation, err_msg=name)

    # To a submission folder as nnU-Net documents it: best configuration + postprocessing, ensemble, apply.
    run_step("find_best_configuration", [nnunet_command("nnUNetv2_find_best_configuration"), str(DATASET_ID), "-c",
                                         CONFIGURATION, "-tr", TRAINER, "-f", "0", "--disable_ensembling", "-np", "1"],
             env, logs)
    assert TRAINER in (model.parent / "inference_instructions.txt").read_text()
    crossval = model / "crossval_results_folds_0"
    assert (crossval / "postprocessing.pkl").is_file()
    run_step("ensemble", [nnunet_command("nnUNetv2_ensemble"), "-i", str(tmp_path / "predicted"),
                          str(tmp_path / "predicted_installed"), "-o", str(tmp_path / "ensembled"), "-np", "1"],
             env, logs)
    for name, segmentation in predictions.items():  # two identical members: the ensemble is the same
        ensembled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ensembled" / name)))
        np.testing.assert_array_equal(ensembled, segmentation, err_msg=name)
    run_step("apply_postprocessing", [nnunet_command("nnUNetv2_apply_postprocessing"), "-i", str(tmp_path / "ensembled"),
                                      "-o", str(tmp_path / "submission"), "-pp_pkl_file",
                                      str(crossval / "postprocessing.pkl"), "-np", "1", "-plans_json",
                                      str(crossval / "plans.json")], env, logs)
    submitted = sorted(path.name for path in (tmp_path / "submission").glob("*.nii.gz"))
    assert submitted == sorted(predictions)
