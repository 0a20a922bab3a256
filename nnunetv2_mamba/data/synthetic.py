"""Synthetic data for quick starts and tests: an nnU-Net raw dataset (spheres and boxes in noise) and videos
(a moving disk, frames and masks in the layout `nnunetv2_mamba video convert` reads)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np

from nnunetv2_mamba.data.video_io import FRAMES_DIR, MASKS_DIR
from nnunetv2_mamba.io import staged_directory

LABELS = {"background": 0, "sphere": 1, "box": 2}


def _case(rng: np.random.Generator, shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """Return (image float32, label uint8) with one bright sphere (label 1) and one dim box (label 2)."""
    grid = np.indices(shape).astype(np.float32)
    size = np.array(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    center = rng.uniform(0.3, 0.7, len(shape)) * size
    radius = rng.uniform(0.12, 0.22) * size.min()
    distance = np.sqrt(sum((grid[axis] - center[axis]) ** 2 for axis in range(len(shape))))
    label[distance < radius] = 1
    lower = (rng.uniform(0.05, 0.35, len(shape)) * size).astype(int)
    upper = lower + np.maximum(2, (rng.uniform(0.15, 0.3, len(shape)) * size).astype(int))
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    label[box][label[box] == 0] = 2
    image = rng.normal(0.0, 0.3, shape).astype(np.float32)
    image[label == 1] += 2.0
    image[label == 2] += 1.0
    return image, label


def _write(array: np.ndarray, path: Path, spacing: Sequence[float]) -> None:
    import SimpleITK as sitk

    itk_image = sitk.GetImageFromArray(array)
    itk_image.SetSpacing([float(s) for s in reversed(spacing)])  # SimpleITK orders axes x, y, z
    sitk.WriteImage(itk_image, str(path))


def make_synthetic_dataset(raw_root: os.PathLike, dataset_id: int, name: str = "MambaSynthetic",
                           shape: Sequence[int] = (32, 32, 32), n_train: int = 6, n_test: int = 2,
                           seed: int = 0) -> Path:
    """Write Dataset{id}_{name} (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json); return its folder.

    A 2D dataset is a shape of length 2 (stored as single-slice NIfTI files, as nnU-Net expects).
    The folder is written under a temporary name and renamed at the end, so it never exists half-written.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise ValueError(f"shape must be 2 or 3 sizes of at least 8 voxels; got {list(shape)}.")
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999; got {dataset_id}.")
    if n_train < 5:
        raise ValueError(f"nnU-Net's 5-fold split needs at least 5 training cases; got n_train={n_train}.")
    raw_root = Path(raw_root)
    folder = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another dataset id.")
    with staged_directory(folder) as staging:
        rng = np.random.default_rng(seed)
        stored_shape = shape if len(shape) == 3 else (1,) + shape
        spacing = (1.0,) * 3 if len(shape) == 3 else (999.0, 1.0, 1.0)
        for split, count in (("Tr", n_train), ("Ts", n_test)):
            (staging / f"images{split}").mkdir()
            (staging / f"labels{split}").mkdir()
            for index in range(count):
                image, label = _case(rng, shape)
                case = f"case_{split.lower()}{index:03d}"
                _write(image.reshape(stored_shape), staging / f"images{split}" / f"{case}_0000.nii.gz", spacing)
                _write(label.reshape(stored_shape), staging / f"labels{split}" / f"{case}.nii.gz", spacing)
        dataset_json = {"channel_names": {"0": "synthetic"}, "labels": LABELS, "numTraining": n_train,
                        "file_ending": ".nii.gz", "name": name,
                        "description": "Synthetic spheres (1) and boxes (2) in Gaussian noise"}
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


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
