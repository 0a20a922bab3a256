"""Reading videos: folders of frames (or video files), per-frame masks and the manifest of a converted dataset.

A video is a folder of frame images (sorted naturally: 2 before 10) or a video file; masks are a folder of images
with the frames' file stems (or a mask video). The readers raise ``VideoDataError`` naming the file and the fix.
Used by the conversion (``video_convert``), the export (``video_export``) and the metrics
(``nnunetv2_mamba.evaluation.video_metrics``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv", ".gif")
#: Written by ``video_to_nnunet`` into the dataset folder: which frames of which video every case holds.
MANIFEST_NAME = "video_manifest.json"
FRAMES_DIR = "frames"
MASKS_DIR = "masks"


class VideoDataError(ValueError):
    """The video data cannot be converted; the message names the file or value and the fix."""


def natural_key(name: str):
    """Return a sort key that orders 'frame2' before 'frame10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass
class VideoSource:
    """Where one video's frames come from: a folder of images or a video file."""

    name: str
    path: Path
    #: Frame files in temporal order (empty for a video file).
    frame_files: List[Path] = field(default_factory=list)

    @property
    def is_file(self) -> bool:
        """Return True for a video file, False for a folder of frames."""
        return self.path.is_file()


def find_videos(folder: Path) -> Dict[str, VideoSource]:
    """Return {video name: source} for the sub-folders of frames and the video files in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoDataError(f"{folder} does not exist or is not a folder.")
    videos: Dict[str, VideoSource] = {}
    for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted((p for p in entry.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.name.startswith(".")), key=lambda p: natural_key(p.stem))
            if not files:
                raise VideoDataError(f"Video folder {entry} contains no frames ({', '.join(IMAGE_EXTENSIONS)}).")
            stems = [p.stem for p in files]
            duplicates = sorted({s for s in stems if stems.count(s) > 1})
            if duplicates:
                raise VideoDataError(f"Video folder {entry} has several files per frame name {duplicates[:5]} "
                                     "(e.g. both .png and .jpg); keep one file per frame.")
            name, source = entry.name, VideoSource(entry.name, entry, files)
        elif entry.suffix.lower() in VIDEO_EXTENSIONS:
            name, source = entry.stem, VideoSource(entry.stem, entry)
        else:
            continue
        if name in videos:
            raise VideoDataError(f"Video {name!r} exists twice in {folder} ({videos[name].path.name} and "
                                 f"{entry.name}); keep one.")
        videos[name] = source
    return videos


def read_image(path: Path) -> np.ndarray:
    """Return the pixels of an image file as (H, W) or (H, W, C)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode == "P" or image.mode == "1":
                return np.asarray(image).astype(np.uint8)  # palette index / bit, not colour
            if image.mode not in ("L", "RGB", "RGBA", "I;16", "I", "F", "LA"):
                image = image.convert("RGB")
            return np.asarray(image)
    except OSError as error:
        raise VideoDataError(f"Cannot read image {path}: {error}") from None


def read_video_file(path: Path) -> np.ndarray:
    """Return all frames of a video file as (T, H, W[, C]); a clear message if no video reader is installed."""
    reasons = []
    try:
        import imageio.v3 as iio

        return np.asarray(iio.imread(path, index=None))
    except ImportError:
        reasons.append("imageio is not installed")
    except Exception as error:  # imageio raises OSError/ValueError for missing plugins and broken files alike
        reasons.append(f"imageio: {str(error).splitlines()[0]}")
    try:
        import cv2
    except ImportError:
        raise VideoDataError(f"Cannot read video file {path} ({'; '.join(reasons)}). Reading {path.suffix} files "
                             "needs a video reader: pip install 'imageio[ffmpeg]' (or 'imageio[pyav]', or "
                             "opencv-python), or extract the frames into a folder of PNG/JPG images.") from None
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1] if frame.ndim == 3 else frame)  # OpenCV decodes BGR
    capture.release()
    if not frames:
        raise VideoDataError(f"Cannot read any frame from video file {path} ({'; '.join(reasons)}; OpenCV read "
                             "nothing either).")
    return np.stack(frames)


def read_frames(source: VideoSource) -> Tuple[List[str], List[np.ndarray], List[str]]:
    """Return (frame names, frame arrays, display labels) of a video source."""
    if source.is_file:
        frames = read_video_file(source.path)
        names = [f"{index:05d}" for index in range(len(frames))]
        return names, list(frames), [f"{source.path.name} frame {index}" for index in range(len(frames))]
    arrays = [read_image(path) for path in source.frame_files]
    return [p.stem for p in source.frame_files], arrays, [str(p) for p in source.frame_files]


def check_same_size(video: str, arrays: Sequence[np.ndarray], labels: Sequence[str], what: str) -> Tuple[int, int]:
    """Return the common (H, W) of the arrays or raise VideoDataError naming the first different one."""
    height, width = arrays[0].shape[:2]
    for array, label in zip(arrays, labels):
        if array.shape[:2] != (height, width):
            raise VideoDataError(f"The {what} of video {video!r} have different sizes: {labels[0]} is "
                                 f"{height}x{width} (HxW) but {label} is {array.shape[0]}x{array.shape[1]}. "
                                 f"All frames of a video must have one size; resize or crop them first.")
    return height, width


def to_channels(frame: np.ndarray, grayscale: bool) -> np.ndarray:
    """Return a frame as (C, H, W) uint8-range values: 1 channel if grayscale, else 1 (gray) or 3 (RGB)."""
    if frame.ndim == 2:
        return frame[None]
    if frame.shape[2] in (2, 4):  # drop the alpha channel
        frame = frame[..., :-1]
    if frame.shape[2] == 1:
        return np.moveaxis(frame, 2, 0)
    if grayscale:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601 luma
        return np.rint(frame[..., :3].astype(np.float64) @ weights).astype(frame.dtype)[None]
    return np.moveaxis(frame[..., :3], 2, 0)


def binarize_mask(mask: np.ndarray, label: str, threshold: Optional[float] = None) -> np.ndarray:
    """Return a uint8 {0, 1} mask; raise VideoDataError for colour or non-binary masks without a threshold."""
    if mask.ndim == 3:
        channels = mask[..., :3] if mask.shape[2] >= 3 else mask[..., :1]
        if any(not np.array_equal(channels[..., 0], channels[..., c]) for c in range(1, channels.shape[2])):
            raise VideoDataError(f"Mask {label} is a colour image with different channels; masks must be "
                                 "single-channel (black background, one foreground value).")
        mask = channels[..., 0]
    if threshold is not None:
        return (mask >= threshold).astype(np.uint8)
    values = np.unique(mask)
    # Binary: {0}, {v} or {0, v} for one foreground value v (a frame may be all background or all object).
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise VideoDataError(f"Mask {label} is not binary: it has {len(values)} values ({shown}). Masks must "
                             "hold 0 for background and one foreground value (e.g. 1 or 255). For anti-aliased or "
                             "JPEG-compressed masks pass a threshold (--mask-threshold 128).")
    return (mask > 0).astype(np.uint8)


def read_masks(source: VideoSource, frame_names: Sequence[str], threshold: Optional[float] = None,
               allow_extra: bool = False) -> np.ndarray:
    """Return the (T, H, W) {0,1} masks of a video's frames; raise VideoDataError for missing masks.

    ``allow_extra``: masks of other frames in the folder are ignored instead of reported.
    """
    if source.is_file:
        arrays = read_video_file(source.path)
        if len(arrays) != len(frame_names):
            raise VideoDataError(f"Mask video {source.path} has {len(arrays)} frames but the video has "
                                 f"{len(frame_names)}; every frame needs a mask.")
        labels = [f"{source.path.name} frame {index}" for index in range(len(arrays))]
    else:
        by_stem = {p.stem: p for p in source.frame_files}
        missing = [name for name in frame_names if name not in by_stem]
        if missing:
            raise VideoDataError(f"Video {source.name!r}: {len(missing)} frame(s) have no mask in {source.path} "
                                 f"(e.g. {missing[:5]}). Every frame needs a mask with the same file name stem; "
                                 "remove unlabelled frames or put those videos in the test folder.")
        extra = sorted(set(by_stem) - set(frame_names), key=natural_key)
        if extra and not allow_extra:
            raise VideoDataError(f"Video {source.name!r}: masks {extra[:5]} in {source.path} have no frame of the "
                                 "same name; check the file names.")
        files = [by_stem[name] for name in frame_names]
        arrays = [read_image(path) for path in files]
        labels = [str(path) for path in files]
    check_same_size(source.name, list(arrays), labels, "masks")
    return np.stack([binarize_mask(np.asarray(a), label, threshold) for a, label in zip(arrays, labels)])


def read_all_masks(source: VideoSource, threshold: Optional[float] = None) -> Tuple[List[str], np.ndarray]:
    """Return (frame names, (T, H, W) {0,1} masks) of every mask of a mask folder or mask video."""
    if source.is_file:
        masks = read_masks(source, [f"{index:05d}" for index in range(len(read_video_file(source.path)))],
                           threshold)
        return [f"{index:05d}" for index in range(len(masks))], masks
    names = [p.stem for p in source.frame_files]
    return names, read_masks(source, names, threshold)


def load_manifest(dataset: os.PathLike) -> dict:
    """Return the video manifest of a converted dataset (its folder or the manifest file)."""
    path = Path(dataset)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise VideoDataError(f"{path} not found: pass the dataset folder written by `nnunetv2_mamba video "
                             "convert` (it holds video_manifest.json).")
    return json.loads(path.read_text())

