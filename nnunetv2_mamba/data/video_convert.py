"""Videos -> nnU-Net raw dataset: every video (or clip) becomes one 3D case (frames, H, W) with time first.

Input layout (``video_to_nnunet``)::

    <input_dir>/frames/<video>/<frame>.png|jpg|...   one folder of frames per video (or frames/<video>.mp4, ...)
    <input_dir>/masks/<video>/<frame>.png            one binary mask per frame, same file stem as the frame

Each case is stored with one file per colour channel, time as the first axis and a time spacing larger than the
in-plane spacing, so that nnU-Net keeps time first and (all clips sharing one spacing) never resamples along it.
A manifest (``video_manifest.json``) in the dataset folder records which frames every case holds, so that
``video_export.predictions_to_frames`` can write nnU-Net's predictions back as one mask image per frame.
The dataset is written into a staging folder and renamed at the end (``nnunetv2_mamba.io.staged_directory``):
an error never leaves a half-written dataset behind.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from nnunetv2_mamba.data.video_io import (FRAMES_DIR, MANIFEST_NAME, MASKS_DIR, VideoDataError, check_same_size,
                                          find_videos, read_frames, read_masks, to_channels)
from nnunetv2_mamba.io import staged_directory

logger = logging.getLogger(__name__)

#: Time spacing written into the clips: larger than the in-plane spacing (1) so nnU-Net keeps time first.
TIME_SPACING = 10.0
LABELS = {"background": 0, "foreground": 1}


def _write_nifti(array: np.ndarray, path: Path, time_spacing: float) -> None:
    """Write a (T, H, W) array with spacing (time, 1, 1) as NIfTI."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, float(time_spacing)))  # SimpleITK orders x (W), y (H), z (T)
    sitk.WriteImage(image, str(path), True)


def case_identifier(video: str) -> str:
    """Return a file-name-safe nnU-Net case identifier for a video name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", video).strip("_") or "video"


def _clips(nframes: int, clip_length: Optional[int]) -> List[Tuple[int, int]]:
    """Return [start, stop) frame ranges: the whole video, or consecutive clips of clip_length frames."""
    if not clip_length or clip_length >= nframes:
        return [(0, nframes)]
    return [(start, min(start + clip_length, nframes)) for start in range(0, nframes, clip_length)]


def _convert_split(input_dir: Path, staging: Path, split: str, manifest: dict, grayscale: bool,
                   mask_threshold: Optional[float], clip_length: Optional[int], time_spacing: float,
                   frames_dir: str, masks_dir: str, masks_required: bool) -> Optional[int]:
    """Write imagesXx (and labelsXx) of one split; return its number of channels (None if no videos)."""
    videos = find_videos(input_dir / frames_dir)
    if not videos:
        raise VideoDataError(f"{input_dir / frames_dir} contains no video folders or video files.")
    mask_root = input_dir / masks_dir
    mask_sources = find_videos(mask_root) if mask_root.is_dir() else {}
    if masks_required and not mask_root.is_dir():
        raise VideoDataError(f"{input_dir} has no {masks_dir}/ folder: training videos need per-frame masks "
                             f"({masks_dir}/<video>/<frame>.png).")
    missing_videos = [name for name in videos if name not in mask_sources]
    if masks_required and missing_videos:
        raise VideoDataError(f"No masks for video(s) {missing_videos[:5]} in {mask_root}; every training video "
                             "needs a mask folder (or mask video) of the same name.")
    write_labels = bool(mask_sources) and not missing_videos
    if mask_sources and missing_videos:
        logger.warning("%s: videos %s have no masks; labels%s are not written for this split.", input_dir,
                       missing_videos[:5], split)
    (staging / f"images{split}").mkdir()
    if write_labels:
        (staging / f"labels{split}").mkdir()
    channels = None
    for video, source in videos.items():
        names, arrays, labels = read_frames(source)
        height, width = check_same_size(video, arrays, labels, "frames")
        per_frame = [to_channels(np.asarray(frame), grayscale) for frame in arrays]
        for frame, label in zip(per_frame, labels):
            if frame.shape[0] != per_frame[0].shape[0]:
                raise VideoDataError(f"Video {video!r} mixes gray and colour frames: {labels[0]} has "
                                     f"{per_frame[0].shape[0]} channel(s), {label} has {frame.shape[0]}; pass "
                                     "--grayscale to convert every frame to one channel.")
        stacked = np.stack(per_frame, axis=1)  # (C, T, H, W)
        if channels is None:
            channels = stacked.shape[0]
        elif stacked.shape[0] != channels:
            raise VideoDataError(f"Video {video!r} has {stacked.shape[0]} colour channel(s) but earlier videos have "
                                 f"{channels}; pass --grayscale to convert every video to one channel.")
        masks = read_masks(mask_sources[video], names, mask_threshold) if write_labels else None
        if masks is not None and masks.shape[1:] != (height, width):
            raise VideoDataError(f"Video {video!r}: masks are {masks.shape[1]}x{masks.shape[2]} (HxW) but the "
                                 f"frames are {height}x{width}; masks must have the frame size.")
        base = case_identifier(video)
        ranges = _clips(len(names), clip_length)
        for index, (start, stop) in enumerate(ranges):
            case = base if len(ranges) == 1 else f"{base}_clip{index:03d}"
            if case in manifest["cases"]:
                other = manifest["cases"][case]
                raise VideoDataError(f"Video {other['video']!r} (images{other['split']}) and video {video!r} "
                                     f"(images{split}) map to the same case name {case!r}; case names must be "
                                     "unique across training and test videos: rename one of them.")
            for channel in range(channels):
                _write_nifti(stacked[channel, start:stop].astype(np.uint8 if stacked.dtype == np.uint8
                                                                  else np.float32),
                             staging / f"images{split}" / f"{case}_{channel:04d}.nii.gz", time_spacing)
            if masks is not None:
                _write_nifti(masks[start:stop], staging / f"labels{split}" / f"{case}.nii.gz", time_spacing)
            manifest["cases"][case] = {"video": video, "split": split, "frames": names[start:stop],
                                       "first_frame": start, "size": [int(height), int(width)],
                                       "labelled": masks is not None}
    return channels


def video_to_nnunet(input_dir: os.PathLike, raw_root: os.PathLike, dataset_id: int, name: str = "Video",
                    test_dir: Optional[os.PathLike] = None, clip_length: Optional[int] = None,
                    grayscale: bool = False, mask_threshold: Optional[float] = None,
                    time_spacing: float = TIME_SPACING, frames_dir: str = FRAMES_DIR,
                    masks_dir: str = MASKS_DIR) -> Path:
    """Write Dataset{id}_{name} (imagesTr, labelsTr[, imagesTs, labelsTs], dataset.json, manifest); return it.

    ``input_dir`` holds the training videos (frames/ and masks/); ``test_dir`` optional test videos (masks
    optional). ``clip_length`` splits videos into consecutive clips of that many frames (default: one case per
    video). ``mask_threshold`` binarises non-binary masks (value >= threshold is foreground).
    """
    input_dir = Path(input_dir)
    if not 1 <= int(dataset_id) <= 999:
        raise VideoDataError(f"dataset_id must be between 1 and 999; got {dataset_id}.")
    if clip_length is not None and int(clip_length) < 1:
        raise VideoDataError(f"clip_length must be at least 1 frame; got {clip_length}.")
    if float(time_spacing) <= 1.0:
        raise VideoDataError(f"time_spacing must be larger than the in-plane spacing 1.0 so that nnU-Net keeps "
                             f"time as the first axis; got {time_spacing}.")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise VideoDataError(f"Dataset name {name!r} may only contain letters, digits, '_' and '-'.")
    raw_root = Path(raw_root)
    folder = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another dataset id.")
    existing = list(raw_root.glob(f"Dataset{int(dataset_id):03d}_*")) if raw_root.is_dir() else []
    if existing:
        raise FileExistsError(f"Dataset id {int(dataset_id)} is already used by {existing[0]}; choose another id.")
    with staged_directory(folder) as staging:
        manifest = {"format": 1, "time_spacing": float(time_spacing), "grayscale": bool(grayscale),
                    "source": str(input_dir.resolve()), "cases": {}}
        channels = _convert_split(input_dir, staging, "Tr", manifest, grayscale, mask_threshold, clip_length,
                                  time_spacing, frames_dir, masks_dir, masks_required=True)
        n_train = len(manifest["cases"])
        if test_dir is not None:
            test_channels = _convert_split(Path(test_dir), staging, "Ts", manifest, grayscale, mask_threshold,
                                           clip_length, time_spacing, frames_dir, masks_dir, masks_required=False)
            if test_channels != channels:
                raise VideoDataError(f"Test videos have {test_channels} channel(s), training videos {channels}; "
                                     "pass --grayscale to use one channel for all.")
        if n_train < 5:
            logger.warning("Only %d training cases: nnU-Net's 5-fold split needs at least 5 (use clip_length to "
                           "split long videos into several cases).", n_train)
        channel_names = {"0": "gray"} if channels == 1 else {str(c): n for c, n in enumerate("RGB")}
        dataset_json = {"channel_names": channel_names, "labels": LABELS, "numTraining": n_train,
                        "file_ending": ".nii.gz", "name": name,
                        "description": "Video clips stacked as 3D images (frames, height, width); time first. "
                                       f"Written by nnunetv2_mamba video convert; see {MANIFEST_NAME}."}
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    logger.info("Wrote %s (%d training cases).", folder, n_train)
    return folder


