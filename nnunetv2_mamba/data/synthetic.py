"""A small synthetic nnU-Net raw dataset (spheres and boxes in noise) for quick starts and end-to-end tests."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np

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
    raw_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=raw_root))
    try:
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
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
