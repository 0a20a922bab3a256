"""The MNI152 tissue dataset: shapes, labels, tissue contrast, determinism, spacing variety, nnU-Net validity."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_mamba.data import mni152


def _read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return mni152.make_mni152_dataset(tmp_path_factory.mktemp("raw"), 152, n_train=6, n_test=2, size=24, seed=3)


def _cases(folder, split):
    return sorted((folder / f"images{split}").glob("*_0000.nii.gz"))


def test_files_shapes_labels_and_contrast(dataset):
    assert dataset.name == "Dataset152_MNI152Tissues"
    assert [p.name for p in _cases(dataset, "Ts")] == ["mni_ts000_0000.nii.gz", "mni_ts001_0000.nii.gz"]
    spacings = []
    for split, count in (("Tr", 6), ("Ts", 2)):
        images = _cases(dataset, split)
        assert len(images) == count and len(list((dataset / f"labels{split}").glob("*.nii.gz"))) == count
        for image_path in images:
            image, spacing = _read(image_path)
            label, label_spacing = _read(dataset / f"labels{split}" / image_path.name.replace("_0000", ""))
            assert image.dtype == np.float32 and label.dtype == np.uint8
            assert image.shape == label.shape and spacing == pytest.approx(label_spacing)
            # Field of view 80-100 % of 24 voxels at the nominal spacing, whatever the case's spacing.
            nominal = mni152.NOMINAL_SPACING_AT_DEFAULT_SIZE * mni152.DEFAULT_SIZE / 24
            field_of_view = np.array(image.shape) * np.array(spacing)
            assert np.all(field_of_view > 0.7 * 24 * nominal) and np.all(field_of_view < 1.1 * 24 * nominal)
            assert set(np.unique(label)) == {0, 1, 2, 3}, image_path.name
            means = [image[label == value].mean() for value in (1, 2, 3)]
            assert means[0] < means[1] < means[2], (image_path.name, means)  # T1: CSF < GM < WM
            assert image[label == 0].mean() < means[0]
            spacings.append(spacing)
    assert len(set(spacings)) == len(spacings)  # every case its own spacing


def test_spacing_variety_includes_anisotropic_cases():
    draws = [mni152.case_spacing_and_shape(np.random.default_rng([0, 0, i]), 64)[0] for i in range(60)]
    anisotropic = [s for s in draws if max(s) / min(s) > 1.5]
    assert 0.15 < len(anisotropic) / len(draws) < 0.55
    isotropic = [s[0] for s in draws if max(s) / min(s) < 1.01]
    assert min(isotropic) < 2.3 and max(isotropic) > 2.7  # nominal 2.5 mm x 0.85-1.15


def test_dataset_json_is_valid_for_nnunet(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    description = json.loads((dataset / "dataset.json").read_text())
    assert description["labels"] == {"background": 0, "CSF": 1, "grey matter": 2, "white matter": 3}
    assert description["numTraining"] == 6 and description["channel_names"] == {"0": "T1"}
    verify_dataset_integrity(str(dataset), num_processes=1)  # raises on any inconsistency


def test_same_seed_gives_identical_files_and_another_seed_does_not(dataset, tmp_path):
    again = mni152.make_mni152_dataset(tmp_path, 152, n_train=6, n_test=2, size=24, seed=3)
    other = mni152.make_mni152_dataset(tmp_path / "other", 152, n_train=6, n_test=2, size=24, seed=4)
    for path in sorted(dataset.rglob("*.nii.gz")):
        relative = path.relative_to(dataset)
        first, second = _read(path), _read(again / relative)
        assert np.array_equal(first[0], second[0]) and first[1] == second[1], relative
        assert not np.array_equal(first[0], _read(other / relative)[0]), relative
    # Held-out cases come from other draws than the training cases.
    assert not np.array_equal(_read(_cases(dataset, "Tr")[0])[0], _read(_cases(dataset, "Ts")[0])[0])


def test_existing_folder_and_bad_arguments_are_clear_errors_and_failures_leave_nothing(dataset, tmp_path,
                                                                                        monkeypatch):
    with pytest.raises(FileExistsError, match="already exists"):
        mni152.make_mni152_dataset(dataset.parent, 152, n_train=6, n_test=2, size=24, seed=3)
    with pytest.raises(ValueError, match="5-fold"):
        mni152.make_mni152_dataset(tmp_path, 152, n_train=3)
    with pytest.raises(ValueError, match="size"):
        mni152.make_mni152_dataset(tmp_path, 152, size=8)
    calls = []

    def failing_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_case(*args, **kwargs)

    real_case = mni152.make_case
    monkeypatch.setattr(mni152, "make_case", failing_case)
    with pytest.raises(RuntimeError, match="disk full"):
        mni152.make_mni152_dataset(tmp_path / "raw", 153, n_train=5, n_test=1, size=24)
    assert list((tmp_path / "raw").iterdir()) == []  # no half-written dataset, no staging folder
