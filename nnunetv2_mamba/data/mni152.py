"""A brain-tissue nnU-Net raw dataset built from the MNI ICBM152 2009 template that nilearn ships.

nilearn's ``datasets/data/`` folder holds the symmetric ICBM152 2009a T1 template and its grey- and white-matter
probability maps (1 mm, 197 x 233 x 189 voxels). They are read directly with nibabel: nothing is downloaded and
no nilearn fetcher is called. Every case is drawn from its own seeded generator, so the same seed gives
byte-identical files:

- geometry: a random field of view (80-100 % of ``size`` voxels at the nominal spacing) centred near the brain,
  rotated (up to 15 degrees about every axis), scaled (0.9-1.1) and elastically deformed (a smooth random
  displacement of about 3 mm), sampled at a per-case spacing (nominal x 0.85-1.15; every third case on average
  anisotropic: one axis 1.6-2.2 x coarser, averaged over the slice thickness);
- intensities: the T1 template with a smooth multiplicative bias field, a gamma change, a contrast/offset change
  and Rician noise;
- labels from the resampled probability maps: 0 background, 1 CSF, 2 grey matter, 3 white matter.

"Brain" is the closed, hole-filled region where GM + WM >= 0.3 (``BRAIN_THRESHOLD``; closing with
``BRAIN_CLOSING_MM`` = 5 mm of 6-connected dilations, then 3D hole filling). It takes in the sulci between the
gyri and the ventricles enclosed by tissue, which is where CSF is; in the template that gives CSF 7 %, GM 59 %
and WM 34 % of the brain (the template's GM map includes the deep grey nuclei and the cerebellar cortex), and
mean T1 (0-1) of 0.38 (CSF, partial-volumed: the template is an average of 152 brains), 0.65 (GM), 0.84 (WM). CSF = brain minus GM minus WM, as a
probability: p_csf = brain - p_gm - p_wm (clipped at 0). A voxel outside the brain (resampled brain mask < 0.5) is
background; inside, its label is the largest of p_csf, p_gm, p_wm.

The dataset folder is written under a temporary name next to its final place and renamed at the end, so it
never exists half-written.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

LABELS = {"background": 0, "CSF": 1, "grey matter": 2, "white matter": 3}
DEFAULT_NAME = "MNI152Tissues"
TEMPLATE_FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
#: Brain = closing + hole filling of GM + WM >= this probability.
BRAIN_THRESHOLD = 0.3
BRAIN_CLOSING_MM = 5
#: Nominal spacing (mm) of a case of DEFAULT_SIZE voxels per axis; other sizes keep the field of view.
DEFAULT_SIZE = 64
NOMINAL_SPACING_AT_DEFAULT_SIZE = 2.5


class TemplateNotFoundError(FileNotFoundError):
    """nilearn (and with it the MNI152 template files) is not installed."""


def template_folder() -> Path:
    """Return nilearn's ``datasets/data`` folder (without importing nilearn); raise a clear error if missing."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateNotFoundError("The MNI152 demo data come with nilearn, which is not installed: "
                                    "pip install 'nilearn>=0.10'.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise TemplateNotFoundError(f"nilearn at {folder.parent.parent} lacks {', '.join(missing)}; "
                                    "reinstall it: pip install --force-reinstall 'nilearn>=0.10'.")
    return folder


@dataclass
class Template:
    """The template volumes (1 mm voxels, array axes = NIfTI i, j, k) scaled to [0, 1]."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # float32 0/1 brain mask

    @property
    def brain_center(self) -> np.ndarray:
        """Return the centre of the brain mask's bounding box (voxel coordinates)."""
        coordinates = np.nonzero(self.brain > 0.5)
        return np.array([(c.min() + c.max()) / 2.0 for c in coordinates])


def brain_mask(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Return the brain as a 0/1 float32 array: GM + WM >= BRAIN_THRESHOLD, closed, holes filled."""
    from scipy import ndimage

    tissue = (gm + wm) >= BRAIN_THRESHOLD
    # Work on the tissue's bounding box, padded so that the closing is not cut by the border (faster, same result).
    coordinates = np.nonzero(tissue)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coordinates)
    padded = np.pad(tissue[box], BRAIN_CLOSING_MM + 1)
    closed = ndimage.binary_fill_holes(ndimage.binary_closing(padded, iterations=BRAIN_CLOSING_MM) | padded)
    brain = np.zeros(tissue.shape, dtype=np.float32)
    brain[box] = closed[(slice(BRAIN_CLOSING_MM + 1, -BRAIN_CLOSING_MM - 1),) * 3]
    return brain


_TEMPLATE_CACHE: Dict[str, Template] = {}


def load_template() -> Template:
    """Return the MNI152 template (loaded once per process)."""
    import nibabel

    folder = template_folder()
    key = str(folder)
    if key not in _TEMPLATE_CACHE:
        volumes = {kind: np.asarray(nibabel.load(str(folder / name)).dataobj, dtype=np.float32) / 255.0
                   for kind, name in TEMPLATE_FILES.items()}
        _TEMPLATE_CACHE[key] = Template(t1=volumes["t1"], gm=volumes["gm"], wm=volumes["wm"],
                                        brain=brain_mask(volumes["gm"], volumes["wm"]))
    return _TEMPLATE_CACHE[key]


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], control_points: int, scale: float) -> np.ndarray:
    """Return a smooth random field on ``shape``: Gaussian control points, cubic interpolation."""
    from scipy import ndimage

    coarse = rng.normal(0.0, scale, (control_points,) * 3)
    return ndimage.zoom(coarse, [s / control_points for s in shape], order=3, mode="nearest",
                        grid_mode=True)[:shape[0], :shape[1], :shape[2]].astype(np.float32)


def case_spacing_and_shape(rng: np.random.Generator, size: int) -> Tuple[Tuple[float, ...], Tuple[int, ...]]:
    """Draw one case's voxel spacing (mm, array axes) and shape."""
    nominal = NOMINAL_SPACING_AT_DEFAULT_SIZE * DEFAULT_SIZE / size
    spacing = np.full(3, nominal * rng.uniform(0.85, 1.15))
    if rng.uniform() < 1.0 / 3.0:  # anisotropic: thick slices along one axis
        spacing[rng.integers(3)] *= rng.uniform(1.6, 2.2)
    field_of_view = size * nominal * rng.uniform(0.8, 1.0, 3)
    shape = np.maximum(8, np.round(field_of_view / spacing)).astype(int)
    return tuple(float(round(s, 4)) for s in spacing), tuple(int(s) for s in shape)


def make_case(template: Template, rng: np.random.Generator, size: int = DEFAULT_SIZE):
    """Return (image float32, label uint8, spacing) of one case drawn with ``rng``."""
    from scipy import ndimage

    spacing, shape = case_spacing_and_shape(rng, size)
    spacing_arr = np.array(spacing)
    rotation = _rotation(np.deg2rad(rng.uniform(-15, 15, 3)))
    zoom = rng.uniform(0.9, 1.1)
    center = template.brain_center + rng.normal(0.0, 12.0, 3)  # template voxels are 1 mm
    # Output voxel -> template mm offset from the centre; elastic displacement of about 3 mm.
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) for n in shape], indexing="ij"))
    displacement = np.stack([_smooth_field(rng, shape, 4, 3.0) for _ in range(3)])
    slice_offsets = np.zeros((1, 3))
    thick_axis = int(np.argmax(spacing_arr))
    if spacing_arr[thick_axis] > 1.3 * np.min(spacing_arr):
        # Thick slices: average the T1 over the slab (partial-volume), labels from its centre.
        slice_offsets = np.zeros((3, 3))
        slice_offsets[:, thick_axis] = np.array([-1 / 3, 0.0, 1 / 3]) * spacing_arr[thick_axis]

    def coordinates(offset: np.ndarray) -> np.ndarray:
        millimetres = grid * spacing_arr[:, None, None, None] + offset[:, None, None, None]
        points = np.einsum("ij,j...->i...", rotation * zoom, millimetres) + displacement
        return points + center[:, None, None, None]

    def sample(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, points, order=1, mode="constant", cval=0.0).astype(np.float32)

    center_points = coordinates(np.zeros(3))
    t1 = np.mean([sample(template.t1, coordinates(offset)) for offset in slice_offsets], axis=0)
    gm, wm, brain = (sample(volume, center_points) for volume in (template.gm, template.wm, template.brain))
    csf = np.clip(brain - gm - wm, 0.0, None)
    label = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    label[brain < 0.5] = 0

    # Intensities: bias field (about +-25 %), gamma, contrast and offset, Rician noise.
    bias = np.exp(_smooth_field(rng, shape, 3, 0.15))
    image = np.clip(t1 * bias, 0.0, None) ** rng.uniform(0.8, 1.25)
    image = image * rng.uniform(0.7, 1.3) + rng.uniform(-0.05, 0.05)
    sigma = rng.uniform(0.01, 0.05)
    image = np.sqrt((image + rng.normal(0.0, sigma, shape)) ** 2 + rng.normal(0.0, sigma, shape) ** 2)
    return (1000.0 * image).astype(np.float32), label, spacing


def _write(array: np.ndarray, path: Path, spacing: Sequence[float]) -> None:
    import SimpleITK as sitk

    itk_image = sitk.GetImageFromArray(array)
    itk_image.SetSpacing([float(s) for s in reversed(spacing)])  # SimpleITK orders axes x, y, z
    sitk.WriteImage(itk_image, str(path), useCompression=True)


def dataset_folder_name(dataset_id: int, name: str = DEFAULT_NAME) -> str:
    """Return nnU-Net's folder name, ``Dataset<id>_<name>``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def make_mni152_dataset(raw_root: os.PathLike, dataset_id: int, name: str = DEFAULT_NAME, n_train: int = 24,
                        n_test: int = 6, size: int = DEFAULT_SIZE, seed: int = 0,
                        progress: Optional[callable] = None) -> Path:
    """Write ``raw_root/Dataset<id>_<name>`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json); return it.

    Training case i is drawn from the generator seeded with (seed, 0, i), test case i from (seed, 1, i): the
    held-out cases never share a draw with the training cases. ``size`` is the nominal number of voxels per
    axis (64: about 2.5 mm); ``progress`` is called once per written case.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999; got {dataset_id}.")
    if n_train < 5:
        raise ValueError(f"nnU-Net's 5-fold split needs at least 5 training cases; got n_train={n_train}.")
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1; got {n_test}.")
    if not 16 <= int(size) <= 256:
        raise ValueError(f"size (voxels per axis) must be between 16 and 256; got {size}.")
    template = load_template()
    raw_root = Path(raw_root)
    folder = raw_root / dataset_folder_name(dataset_id, name)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another dataset id.")
    raw_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=raw_root))
    try:
        for split_index, (split, count) in enumerate((("Tr", n_train), ("Ts", n_test))):
            (staging / f"images{split}").mkdir()
            (staging / f"labels{split}").mkdir()
            for index in range(count):
                rng = np.random.default_rng([int(seed), split_index, index])
                image, label, spacing = make_case(template, rng, int(size))
                case = f"mni_{split.lower()}{index:03d}"
                _write(image, staging / f"images{split}" / f"{case}_0000.nii.gz", spacing)
                _write(label, staging / f"labels{split}" / f"{case}.nii.gz", spacing)
                if progress is not None:
                    progress()
        dataset_json = {
            "channel_names": {"0": "T1"}, "labels": LABELS, "numTraining": int(n_train), "file_ending": ".nii.gz",
            "name": name,
            "description": "Brain tissues (CSF, grey matter, white matter) in random deformed crops of the MNI "
                           "ICBM152 2009a symmetric T1 template, built by nnunetv2_mamba.data.mni152",
            "reference": "Fonov et al., NeuroImage 2011 (ICBM152 2009 templates, as shipped by nilearn)",
            "nnunetv2_mamba": {"seed": int(seed), "size": int(size), "n_test": int(n_test)},
        }
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
