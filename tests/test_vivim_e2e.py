"""End to end on the CPU: generated videos -> video convert -> nnU-Net plan/train/predict with nnUNetTrainerVivim
-> predictions back to per-frame masks -> video metrics."""
import json
from pathlib import Path

import pytest

from nnunetv2_mamba.data.synthetic import make_synthetic_videos
from nnunetv2_mamba.data.video_convert import video_to_nnunet
from nnunetv2_mamba.data.video_export import predictions_to_frames
from nnunetv2_mamba.evaluation.video_metrics import METRICS, evaluate_video_predictions
from tests.e2e.helpers import run_nnunet_pipeline

DATASET_ID = 961


def _make_video_dataset(raw_root: Path, dataset_id: int) -> Path:
    """Convert 5 training videos and 1 test video (5 frames of 32x32) into an nnU-Net raw dataset."""
    sources = raw_root.parent / "video_sources"
    make_synthetic_videos(sources / "train", n_videos=5, nframes=5, size=(32, 32), seed=0, prefix="train")
    make_synthetic_videos(sources / "test", n_videos=1, nframes=5, size=(32, 32), seed=1, prefix="test")
    return video_to_nnunet(sources / "train", raw_root, dataset_id, name="VivimVideos", test_dir=sources / "test")


@pytest.mark.e2e
def test_vivim_trains_predicts_and_exports_frames(tmp_path):
    result = run_nnunet_pipeline(tmp_path, "nnUNetTrainerVivim", configuration="3d_fullres",
                                 dataset_id=DATASET_ID, make_dataset=_make_video_dataset)
    plans = json.loads((result["results_dir"] / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    # The trainer's adjustment is saved with the model: 5-frame patch, in-plane multiple of 32, time kept first.
    assert configuration["patch_size"] == [5, 32, 32]
    assert plans["transpose_forward"] == [0, 1, 2]
    assert all(stride[0] == 1 for stride in configuration["architecture"]["arch_kwargs"]["strides"])
    assert 0.0 <= result["summary"]["foreground_mean"]["Dice"] <= 1.0

    frames = predictions_to_frames(result["predictions_dir"], result["dataset_dir"], tmp_path / "frames")
    assert sorted(p.name for p in frames.iterdir()) == ["test00"]
    assert len(list((frames / "test00").glob("*.png"))) == 5  # every frame of the clip is predicted
    evaluation = evaluate_video_predictions(frames, _test_masks(result["dataset_dir"]),
                                            output_dir=tmp_path / "metrics", inference_seconds=1.0)
    assert evaluation.dataset["frames"] == 5
    # The exported masks are nnU-Net's prediction: per-frame counts add up to nnU-Net's own 3D counts.
    (case,) = result["summary"]["metric_per_case"]
    nnunet_counts = case["metrics"]["1"]
    for count in ("tp", "fp", "fn"):
        assert sum(row[count] for row in evaluation.frames) == nnunet_counts[count.upper()]
    assert all(0.0 <= evaluation.dataset[m] <= 1.0 for m in METRICS)
    assert (tmp_path / "metrics" / "video_metrics.csv").is_file()


def _test_masks(dataset_dir: Path) -> Path:
    """Return the masks folder of the generated test videos (next to the raw folder)."""
    return Path(json.loads((dataset_dir / "video_manifest.json").read_text())["source"]).parent / "test" / "masks"
