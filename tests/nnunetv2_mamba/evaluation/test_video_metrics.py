"""Video metrics against hand-computed values; per-video / dataset averaging; reports; FPS."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nnunetv2_mamba.data.video_io import VideoDataError
from nnunetv2_mamba.evaluation.video_metrics import (evaluate_video_predictions, format_table, frame_metrics,
                                                     measure_network_fps)


def test_frame_metrics_by_hand():
    prediction = np.array([[1, 1, 1, 0],
                           [0, 0, 0, 0]])
    reference = np.array([[1, 1, 0, 1],
                          [1, 1, 0, 0]])
    # tp = 2, fp = 1, fn = 3
    metrics = frame_metrics(prediction, reference)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (2, 1, 3)
    assert metrics["jaccard"] == pytest.approx(2 / 6)
    assert metrics["dice"] == pytest.approx(4 / 8)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 5)


def test_empty_frame_conventions():
    empty, full = np.zeros((3, 3)), np.ones((3, 3))
    assert frame_metrics(empty, empty) == {"jaccard": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0,
                                           "tp": 0, "fp": 0, "fn": 0}
    missed = frame_metrics(empty, full)  # object not found
    assert (missed["jaccard"], missed["dice"], missed["precision"], missed["recall"]) == (0.0, 0.0, 0.0, 0.0)
    false_alarm = frame_metrics(full, empty)
    assert (false_alarm["dice"], false_alarm["precision"], false_alarm["recall"]) == (0.0, 0.0, 0.0)
    with pytest.raises(VideoDataError, match="differs"):
        frame_metrics(np.zeros((2, 2)), np.zeros((3, 3)))


def _write_masks(root, video, masks, value=255):
    folder = root / video
    folder.mkdir(parents=True)
    for index, mask in enumerate(masks):
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * value).save(folder / f"f{index}.png")


def test_per_video_and_dataset_averages(tmp_path):
    reference, prediction = tmp_path / "ref", tmp_path / "pred"
    a = np.array([[1, 1], [0, 0]])
    # Video "a": frame 0 perfect (Dice 1), frame 1 prediction half of the object (Dice 2/3, recall 1/2).
    _write_masks(reference, "a", [a, a])
    _write_masks(prediction, "a", [a, [[1, 0], [0, 0]]], value=1)
    # Video "b": one frame, prediction disjoint from the object (all metrics 0).
    _write_masks(reference, "b", [[[0, 0], [0, 1]]])
    _write_masks(prediction, "b", [[[1, 0], [0, 0]]])
    _write_masks(prediction, "b_extra_video_is_ignored", [a])

    evaluation = evaluate_video_predictions(prediction, reference, output_dir=tmp_path / "out",
                                            inference_seconds=0.5)
    videos = {row["video"]: row for row in evaluation.videos}
    assert videos["a"]["frames"] == 2 and videos["b"]["frames"] == 1
    assert videos["a"]["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert videos["a"]["jaccard"] == pytest.approx((1 + 1 / 2) / 2)
    assert videos["a"]["precision"] == pytest.approx(1.0)
    assert videos["a"]["recall"] == pytest.approx((1 + 1 / 2) / 2)
    assert videos["b"]["dice"] == 0.0
    assert evaluation.dataset["frames"] == 3
    assert evaluation.dataset["dice"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # mean over frames
    assert evaluation.mean_over_videos["dice"] == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)  # mean over videos
    assert evaluation.fps == pytest.approx(6.0)  # 3 frames in 0.5 s

    saved = json.loads((tmp_path / "out" / "video_metrics.json").read_text())
    assert saved["dataset_mean_over_frames"]["dice"] == pytest.approx(evaluation.dataset["dice"])
    assert len(saved["frames"]) == 3 and saved["fps"] == pytest.approx(6.0)
    rows = list(csv.DictReader((tmp_path / "out" / "video_metrics.csv").open()))
    assert [row["video"] for row in rows] == ["a", "b", "ALL (mean over frames)", "ALL (mean over videos)"]
    assert float(rows[0]["recall"]) == pytest.approx(0.75)
    frame_rows = list(csv.DictReader((tmp_path / "out" / "frame_metrics.csv").open()))
    assert [(r["video"], r["frame"]) for r in frame_rows] == [("a", "f0"), ("a", "f1"), ("b", "f0")]

    table = format_table(evaluation)
    assert "mean over frames" in table and "FPS: 6.0" in table
    assert f"{(1 + 2 / 3) / 2:.4f}" in table


def test_missing_predictions_are_reported(tmp_path):
    _write_masks(tmp_path / "ref", "a", [np.ones((2, 2)), np.ones((2, 2))])
    _write_masks(tmp_path / "pred", "a", [np.ones((2, 2))])
    with pytest.raises(VideoDataError, match=r"no predicted mask for frame\(s\) \['f1'\]"):
        evaluate_video_predictions(tmp_path / "pred", tmp_path / "ref")
    _write_masks(tmp_path / "other_pred", "z", [np.ones((2, 2))])
    with pytest.raises(VideoDataError, match=r"No predictions for video\(s\) \['a'\]"):
        evaluate_video_predictions(tmp_path / "other_pred", tmp_path / "ref")
    with pytest.raises(ValueError, match="either fps or inference_seconds"):
        evaluate_video_predictions(tmp_path / "pred", tmp_path / "ref", fps=1.0, inference_seconds=1.0)


def test_measure_network_fps_counts_frames():
    network = torch.nn.Conv3d(1, 1, 1)
    result = measure_network_fps(network, (1, 4, 8, 8), device="cpu", batch=2, warmup=1, repeats=2)
    assert result["fps"] > 0 and result["ms_per_clip"] > 0
    assert result["fps"] == pytest.approx(2 * 4 / (2 * result["ms_per_clip"] / 1000), rel=1e-6)
