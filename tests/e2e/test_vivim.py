"""End to end on the CPU, with the commands docs/VIDEO.md gives: generated videos -> `nnunetv2_mamba video convert`
-> nnUNetv2_plan_and_preprocess (3d_fullres) -> `nnunetv2_mamba video plan` -> nnUNetv2_train / nnUNetv2_predict on
3d_fullres_vivim with nnUNetTrainerVivim -> `video export` (per-frame masks) -> `video evaluate` (video metrics)."""
import json
from pathlib import Path

import pytest

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_mamba.data.synthetic import make_synthetic_videos
from nnunetv2_mamba.data.video_plan import VIVIM_NETWORK_CLASS
from tests.e2e.helpers import nnunet_command, nnunet_env, run_step

DATASET_ID = 961
TRAINER = "nnUNetTrainerVivim_tiny"  # 1 epoch x 2 iterations (tests/e2e/trainers)
CONFIGURATION = "3d_fullres_vivim"


@pytest.mark.e2e
def test_vivim_trains_predicts_and_exports_frames(tmp_path):
    env = nnunet_env(tmp_path)
    logs = tmp_path / "logs"
    sources = tmp_path / "video_sources"
    make_synthetic_videos(sources / "train", n_videos=5, nframes=5, size=(32, 32), seed=0, prefix="train")
    make_synthetic_videos(sources / "test", n_videos=1, nframes=5, size=(32, 32), seed=1, prefix="test")
    mamba, dataset_id = nnunet_command("nnunetv2_mamba"), str(DATASET_ID)

    run_step("convert", [mamba, "video", "convert", str(sources / "train"), "-d", dataset_id, "--name",
                         "VivimVideos", "--test-input", str(sources / "test")], env, logs)
    dataset_dir = next(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*"))
    run_step("plan_and_preprocess", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c",
                                     "3d_fullres", "-np", "1", "--verify_dataset_integrity"], env, logs)
    run_step("video_plan", [mamba, "video", "plan", "-d", dataset_id], env, logs)
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset_dir.name
    planned = json.loads((preprocessed / "nnUNetPlans.json").read_text())

    run_step("train", [nnunet_command("nnUNetv2_train"), dataset_id, CONFIGURATION, "0", "-tr", TRAINER,
                       "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"}, logs)
    predictions = tmp_path / "predictions"
    run_step("predict", [nnunet_command("nnUNetv2_predict"), "-i", str(dataset_dir / "imagesTs"), "-o",
                         str(predictions), "-d", dataset_id, "-c", CONFIGURATION, "-f", "0", "-tr", TRAINER,
                         "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env, logs)
    run_step("evaluate", [nnunet_command("nnUNetv2_evaluate_simple"), str(dataset_dir / "labelsTs"),
                          str(predictions), "-l", "1", "-np", "1"], env, logs)

    # The model's plans are the planner's plans plus the Vivim configurations, unedited by the trainer.
    results_dir = Path(env["nnUNet_results"]) / dataset_dir.name / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    saved = json.loads((results_dir / "plans.json").read_text())
    assert saved == planned
    configuration = PlansManager(saved).get_configuration(CONFIGURATION)
    assert configuration.patch_size == [5, 32, 32] and saved["transpose_forward"] == [0, 1, 2]
    assert configuration.network_arch_class_name == VIVIM_NETWORK_CLASS
    # 3d_fullres_vivim trains on 3d_fullres's preprocessed data (no preprocessing of its own).
    assert configuration.data_identifier == "nnUNetPlans_3d_fullres"
    assert sorted(p.name for p in preprocessed.iterdir() if p.is_dir()) == ["gt_segmentations",
                                                                          "nnUNetPlans_3d_fullres"]
    # The training log and debug.json say which network trained.
    log = next((results_dir / "fold_0").glob("training_log_*.txt")).read_text()
    assert f"network class:  {VIVIM_NETWORK_CLASS}" in log and "scan backend:   torch" in log
    assert json.loads((results_dir / "fold_0" / "debug.json").read_text())["network_class"] == VIVIM_NETWORK_CLASS
    summary = json.loads((predictions / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    frames = tmp_path / "frames"
    run_step("export", [mamba, "video", "export", str(predictions), "--dataset", str(dataset_dir), "-o",
                        str(frames)], env, logs)
    assert sorted(p.name for p in frames.iterdir()) == ["test00"]
    assert len(list((frames / "test00").glob("*.png"))) == 5  # every frame of the clip is predicted
    metrics = tmp_path / "metrics"
    run_step("video_evaluate", [mamba, "video", "evaluate", str(frames), "-r", str(sources / "test" / "masks"),
                                "-o", str(metrics), "--inference-seconds", "1.0"], env, logs)
    evaluation = json.loads((metrics / "video_metrics.json").read_text())
    assert evaluation["dataset_mean_over_frames"]["frames"] == 5 and evaluation["fps"] == pytest.approx(5.0)
    # The exported masks are nnU-Net's prediction: per-frame counts add up to nnU-Net's own 3D counts.
    (case,) = summary["metric_per_case"]
    for count in ("tp", "fp", "fn"):
        assert sum(row[count] for row in evaluation["frames"]) == case["metrics"]["1"][count.upper()]
    assert (metrics / "video_metrics.csv").is_file()
