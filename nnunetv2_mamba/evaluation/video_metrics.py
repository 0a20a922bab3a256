"""Video segmentation metrics as in Vivim's Table 1: per-frame Jaccard, Dice, precision and recall, averaged per
video and over the dataset, plus inference speed in frames per second.

Ratios whose denominator is 0 (empty prediction and/or empty reference) count 1.0 when the frame is empty in
both, else 0.0: a correctly empty frame is perfect, a missed object or a false alarm scores 0.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_mamba.data.video_io import VideoDataError, find_videos, natural_key, read_all_masks, read_masks
from nnunetv2_mamba.io import atomic_write

logger = logging.getLogger(__name__)

METRICS = ("jaccard", "dice", "precision", "recall")


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    """Return numerator / denominator, or the empty-frame convention when the denominator is 0."""
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def frame_metrics(prediction: np.ndarray, reference: np.ndarray) -> Dict[str, float]:
    """Return Jaccard, Dice, precision, recall and the counts tp/fp/fn of two binary masks of one frame."""
    prediction, reference = np.asarray(prediction) > 0, np.asarray(reference) > 0
    if prediction.shape != reference.shape:
        raise VideoDataError(f"Prediction shape {prediction.shape} differs from the reference {reference.shape}.")
    tp = int(np.count_nonzero(prediction & reference))
    fp = int(np.count_nonzero(prediction & ~reference))
    fn = int(np.count_nonzero(~prediction & reference))
    both_empty = tp + fp + fn == 0
    return {"jaccard": _ratio(tp, tp + fp + fn, both_empty), "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
            "precision": _ratio(tp, tp + fp, both_empty), "recall": _ratio(tp, tp + fn, both_empty),
            "tp": tp, "fp": fp, "fn": fn}


def _mean(rows: Sequence[dict]) -> Dict[str, float]:
    """Return the mean of every metric over rows."""
    return {metric: float(np.mean([row[metric] for row in rows])) for metric in METRICS}


@dataclass
class VideoEvaluation:
    """Per-frame rows, per-video means, dataset means (over frames and over videos) and the speed."""

    frames: List[dict] = field(default_factory=list)
    videos: List[dict] = field(default_factory=list)
    dataset: Dict[str, float] = field(default_factory=dict)
    mean_over_videos: Dict[str, float] = field(default_factory=dict)
    fps: Optional[float] = None

    def as_dict(self) -> dict:
        """Return a JSON-ready dict of everything."""
        return {"metrics": list(METRICS), "dataset_mean_over_frames": self.dataset,
                "dataset_mean_over_videos": self.mean_over_videos, "fps": self.fps, "videos": self.videos,
                "frames": self.frames}


def evaluate_masks(prediction_dir: os.PathLike, reference_dir: os.PathLike,
                   mask_threshold: Optional[float] = None) -> VideoEvaluation:
    """Return the metrics of <prediction_dir>/<video>/<frame> masks against <reference_dir>/<video>/<frame>.

    Every reference frame must have a prediction; predictions of frames without a reference are ignored.
    """
    references = find_videos(Path(reference_dir))
    if not references:
        raise VideoDataError(f"{reference_dir} contains no video mask folders.")
    predictions = find_videos(Path(prediction_dir))
    missing = [video for video in references if video not in predictions]
    if missing:
        raise VideoDataError(f"No predictions for video(s) {missing[:5]} in {prediction_dir}; export them with "
                             "`nnunetv2_mamba video export` (one folder of masks per video).")
    evaluation = VideoEvaluation()
    for video, reference_source in references.items():
        names, reference = read_all_masks(reference_source, mask_threshold)
        prediction_source = predictions[video]
        if not prediction_source.is_file:
            available = {p.stem for p in prediction_source.frame_files}
            absent = [name for name in names if name not in available]
            if absent:
                raise VideoDataError(f"Video {video!r}: no predicted mask for frame(s) {absent[:5]} in "
                                     f"{prediction_source.path}; every reference frame needs a prediction.")
        prediction = read_masks(prediction_source, names, 0.5, allow_extra=True)  # any non-zero is object
        if prediction.shape != reference.shape:
            raise VideoDataError(f"Video {video!r}: predicted masks are {prediction.shape[1:]} (HxW) but the "
                                 f"references are {reference.shape[1:]}.")
        rows = []
        for name, predicted_frame, reference_frame in zip(names, prediction, reference):
            rows.append({"video": video, "frame": name, **frame_metrics(predicted_frame, reference_frame)})
        evaluation.frames.extend(rows)
        evaluation.videos.append({"video": video, "frames": len(rows), **_mean(rows)})
    evaluation.dataset = {"videos": len(evaluation.videos), "frames": len(evaluation.frames),
                          **_mean(evaluation.frames)}
    evaluation.mean_over_videos = {"videos": len(evaluation.videos), "frames": len(evaluation.frames),
                                   **_mean(evaluation.videos)}
    return evaluation


def write_reports(evaluation: VideoEvaluation, output_dir: os.PathLike) -> Dict[str, Path]:
    """Write video_metrics.json, video_metrics.csv (per video + dataset rows), frame_metrics.csv; return paths.

    Each file is written atomically (never half-written; an earlier report stays until it is replaced).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "video_metrics.json", "videos_csv": output_dir / "video_metrics.csv",
             "frames_csv": output_dir / "frame_metrics.csv"}
    atomic_write(paths["json"], json.dumps(evaluation.as_dict(), indent=1))
    video_rows = [dict(row) for row in evaluation.videos]
    video_rows.append({"video": "ALL (mean over frames)", **{k: v for k, v in evaluation.dataset.items()
                                                             if k != "videos"}})
    video_rows.append({"video": "ALL (mean over videos)", **{k: v for k, v in evaluation.mean_over_videos.items()
                                                             if k != "videos"}})
    for row in video_rows:
        row["fps"] = "" if evaluation.fps is None else evaluation.fps
    atomic_write(paths["videos_csv"], _csv_text(["video", "frames", *METRICS, "fps"], video_rows))
    atomic_write(paths["frames_csv"], _csv_text(["video", "frame", *METRICS, "tp", "fp", "fn"], evaluation.frames))
    return paths


def _csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """Return rows as CSV text with the given columns."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def evaluate_video_predictions(prediction_dir: os.PathLike, reference_dir: os.PathLike,
                               output_dir: Optional[os.PathLike] = None, fps: Optional[float] = None,
                               inference_seconds: Optional[float] = None,
                               mask_threshold: Optional[float] = None) -> VideoEvaluation:
    """Return (and write to output_dir as CSV/JSON) the video metrics; FPS from ``fps`` or frames / seconds."""
    if fps is not None and inference_seconds is not None:
        raise ValueError("Pass either fps or inference_seconds, not both.")
    evaluation = evaluate_masks(prediction_dir, reference_dir, mask_threshold)
    if inference_seconds is not None:
        if inference_seconds <= 0:
            raise ValueError(f"inference_seconds must be positive; got {inference_seconds}.")
        evaluation.fps = evaluation.dataset["frames"] / float(inference_seconds)
    elif fps is not None:
        evaluation.fps = float(fps)
    if output_dir is not None:
        write_reports(evaluation, output_dir)
    return evaluation


def format_table(evaluation: VideoEvaluation) -> str:
    """Return the per-video and dataset metrics as a fixed-width text table (the CLI prints it)."""
    width = max([len("mean over frames")] + [len(row["video"]) for row in evaluation.videos])
    header = f"{'video':<{width}}  {'frames':>6}  " + "  ".join(f"{m:>9}" for m in METRICS)
    lines = [header, "-" * len(header)]

    def line(name: str, row: dict) -> str:
        return f"{name:<{width}}  {row['frames']:>6}  " + "  ".join(f"{row[m]:>9.4f}" for m in METRICS)

    lines += [line(row["video"], row) for row in sorted(evaluation.videos, key=lambda r: natural_key(r["video"]))]
    lines.append("-" * len(header))
    lines.append(line("mean over frames", evaluation.dataset))
    lines.append(line("mean over videos", evaluation.mean_over_videos))
    lines.append(f"FPS: {evaluation.fps:.1f}" if evaluation.fps is not None else
                 "FPS: not measured (pass --fps or --inference-seconds)")
    return "\n".join(lines)


def measure_network_fps(network, clip_shape: Sequence[int], device=None, batch: int = 1, warmup: int = 3,
                        repeats: int = 10, amp: bool = True) -> Dict[str, float]:
    """Return {'fps', 'ms_per_clip'} of inference on random clips (batch, *clip_shape) = (C, T, H, W).

    Frames per second count every frame of every clip; fp16 autocast on CUDA when ``amp`` (nnU-Net predicts
    under autocast). Timing uses CUDA synchronisation so that asynchronous kernels are included.
    """
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = network.to(device).eval()
    clip = torch.randn(batch, *clip_shape, device=device)

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        for _ in range(warmup):
            network(clip)
        synchronise()
        started = time.perf_counter()
        for _ in range(repeats):
            network(clip)
        synchronise()
    seconds = (time.perf_counter() - started) / repeats
    frames = batch * int(clip_shape[1])
    return {"fps": frames / seconds if seconds > 0 else math.inf, "ms_per_clip": seconds * 1000 / batch}
