"""Videos <-> nnU-Net raw datasets: frames folders (or video files) to stacked clips, predictions back to masks.

Input layout (``video_to_nnunet``)::

    <input_dir>/frames/<video>/<frame>.png|jpg|...   one folder of frames per video (or frames/<video>.mp4, ...)
    <input_dir>/masks/<video>/<frame>.png            one binary mask per frame, same file stem as the frame

Each video (or each clip of ``clip_length`` frames) becomes one nnU-Net case: a 3D image (frames, H, W) with one
file per colour channel, time as the first axis and a time spacing larger than the in-plane spacing, so that
nnU-Net keeps time first and (all clips sharing one spacing) never resamples along it. A manifest
(``video_manifest.json``) in the dataset folder records which frames every case holds, so that
``predictions_to_frames`` can write nnU-Net's predictions back as one mask image per frame.
Every output folder is written under a temporary name and renamed at the end: an error never leaves a
half-written dataset or export behind.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv", ".gif")
MANIFEST_NAME = "video_manifest.json"
#: Time spacing written into the clips: larger than the in-plane spacing (1) so nnU-Net keeps time first.
TIME_SPACING = 10.0
FRAMES_DIR = "frames"
MASKS_DIR = "masks"
LABELS = {"background": 0, "foreground": 1}


class VideoDataError(ValueError):
    """The video data cannot be converted; the message names the file or value and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Reading frames and masks
# ---------------------------------------------------------------------------------------------------------------

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


def _read_image(path: Path) -> np.ndarray:
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


def _read_video_file(path: Path) -> np.ndarray:
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


def _frames_of(source: VideoSource) -> Tuple[List[str], List[np.ndarray], List[str]]:
    """Return (frame names, frame arrays, display labels) of a video source."""
    if source.is_file:
        frames = _read_video_file(source.path)
        names = [f"{index:05d}" for index in range(len(frames))]
        return names, list(frames), [f"{source.path.name} frame {index}" for index in range(len(frames))]
    arrays = [_read_image(path) for path in source.frame_files]
    return [p.stem for p in source.frame_files], arrays, [str(p) for p in source.frame_files]


def _check_same_size(video: str, arrays: Sequence[np.ndarray], labels: Sequence[str], what: str) -> Tuple[int, int]:
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
        arrays = _read_video_file(source.path)
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
        arrays = [_read_image(path) for path in files]
        labels = [str(path) for path in files]
    _check_same_size(source.name, list(arrays), labels, "masks")
    return np.stack([binarize_mask(np.asarray(a), label, threshold) for a, label in zip(arrays, labels)])


def read_all_masks(source: VideoSource, threshold: Optional[float] = None) -> Tuple[List[str], np.ndarray]:
    """Return (frame names, (T, H, W) {0,1} masks) of every mask of a mask folder or mask video."""
    if source.is_file:
        masks = read_masks(source, [f"{index:05d}" for index in range(len(_read_video_file(source.path)))],
                           threshold)
        return [f"{index:05d}" for index in range(len(masks))], masks
    names = [p.stem for p in source.frame_files]
    return names, read_masks(source, names, threshold)


# ---------------------------------------------------------------------------------------------------------------
# Conversion to an nnU-Net raw dataset
# ---------------------------------------------------------------------------------------------------------------

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
        names, arrays, labels = _frames_of(source)
        height, width = _check_same_size(video, arrays, labels, "frames")
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
    raw_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=raw_root))
    try:
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
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote %s (%d training cases).", folder, n_train)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Predictions back to per-frame masks
# ---------------------------------------------------------------------------------------------------------------

def load_manifest(dataset: os.PathLike) -> dict:
    """Return the video manifest of a converted dataset (its folder or the manifest file)."""
    path = Path(dataset)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise VideoDataError(f"{path} not found: pass the dataset folder written by `nnunetv2_mamba video "
                             "convert` (it holds video_manifest.json).")
    return json.loads(path.read_text())


def _staged_output(output_dir: Path, overwrite: bool) -> Path:
    """Return a fresh staging folder next to output_dir, after checking that output_dir may be written."""
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; choose another folder or pass "
                              "--overwrite.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished staging folder to output_dir (replacing an existing one)."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)


def predictions_to_frames(predictions_dir: os.PathLike, dataset: os.PathLike, output_dir: os.PathLike,
                          foreground_value: int = 255, image_format: str = "png", overwrite: bool = False) -> Path:
    """Write nnU-Net predictions (<case>.nii.gz) as <output_dir>/<video>/<frame>.<format> masks; return it.

    Frame names and sizes come from the dataset's manifest; clips of one video go to the same folder.
    """
    from PIL import Image
    import SimpleITK as sitk

    predictions_dir, output_dir = Path(predictions_dir), Path(output_dir)
    manifest = load_manifest(dataset)
    if not 1 <= int(foreground_value) <= 255:
        raise VideoDataError(f"foreground_value must be between 1 and 255; got {foreground_value}.")
    if image_format.lower() not in ("png", "bmp", "tif", "tiff"):
        raise VideoDataError(f"image_format {image_format!r}: masks need a lossless format (png, bmp, tif).")
    if not predictions_dir.is_dir():
        raise VideoDataError(f"Predictions folder {predictions_dir} does not exist.")
    found = {p.name[:-len(".nii.gz")] for p in predictions_dir.glob("*.nii.gz")}
    cases = [case for case in manifest["cases"] if case in found]
    if not cases:
        raise VideoDataError(f"{predictions_dir} holds no prediction (<case>.nii.gz) of the dataset's cases "
                             f"(e.g. {list(manifest['cases'])[:3]}).")
    unknown = sorted(found - set(manifest["cases"]))
    if unknown:
        logger.warning("Predictions %s are not cases of this dataset; skipped.", unknown[:5])
    staging = _staged_output(output_dir, overwrite)
    try:
        for case in cases:
            info = manifest["cases"][case]
            prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions_dir / f"{case}.nii.gz")))
            expected = (len(info["frames"]), *info["size"])
            if prediction.shape != expected:
                raise VideoDataError(f"Prediction {case}.nii.gz has shape {prediction.shape} but the case has "
                                     f"{expected} (frames, H, W); was it predicted from this dataset?")
            video_dir = staging / info["video"]
            video_dir.mkdir(exist_ok=True)
            for frame_name, frame in zip(info["frames"], prediction):
                mask = ((frame > 0) * int(foreground_value)).astype(np.uint8)
                Image.fromarray(mask).save(video_dir / f"{frame_name}.{image_format.lower()}")
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# Synthetic videos (examples, tests)
# ---------------------------------------------------------------------------------------------------------------

def make_synthetic_videos(root: os.PathLike, n_videos: int = 6, nframes: int = 8, size: Tuple[int, int] = (64, 64),
                          seed: int = 0, frame_format: str = "png", prefix: str = "video") -> Path:
    """Write <root>/frames/<video>/<i>.<fmt> RGB frames of a moving disk and <root>/masks/... 0/255 PNG masks."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    for video in range(n_videos):
        frames_dir, masks_dir = root / FRAMES_DIR / f"{prefix}{video:02d}", root / MASKS_DIR / f"{prefix}{video:02d}"
        frames_dir.mkdir(parents=True)
        masks_dir.mkdir(parents=True)
        center = rng.uniform(0.3, 0.7, 2) * (height, width)
        velocity = rng.uniform(-2.0, 2.0, 2)
        radius = rng.uniform(0.12, 0.22) * min(size)
        colour = rng.uniform(120, 255, 3)
        for index in range(nframes):
            cy, cx = center + index * velocity
            mask = (rows - cy) ** 2 + (cols - cx) ** 2 < radius ** 2
            frame = rng.normal(60, 15, (height, width, 3))
            frame[mask] = colour + rng.normal(0, 10, (int(mask.sum()), 3))
            Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(frames_dir / f"{index:04d}.{frame_format}")
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks_dir / f"{index:04d}.png")
    return root
