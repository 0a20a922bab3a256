"""nnU-Net predictions -> per-frame mask images: <output_dir>/<video>/<frame>.png, named as the source frames.

Frame names and sizes come from the manifest that ``video_convert.video_to_nnunet`` wrote into the dataset; clips
of one video go back into one folder. The export is written into a staging folder and renamed at the end
(``nnunetv2_mamba.io.staged_directory``), so an error never leaves a half-written export and an existing export
stays as it was.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from nnunetv2_mamba.data.video_io import VideoDataError, load_manifest
from nnunetv2_mamba.io import staged_directory

logger = logging.getLogger(__name__)


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
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; choose another folder or pass "
                              "--overwrite.")
    with staged_directory(output_dir, replace=True) as staging:
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
    return output_dir

