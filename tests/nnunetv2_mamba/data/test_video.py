"""Video <-> nnU-Net conversion: round trips on generated videos, clear errors, atomic outputs, CLI."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunetv2_mamba.cli import main
from nnunetv2_mamba.data.synthetic import make_synthetic_videos
from nnunetv2_mamba.data.video_convert import video_to_nnunet
from nnunetv2_mamba.data.video_export import predictions_to_frames
from nnunetv2_mamba.data.video_io import MANIFEST_NAME, VideoDataError


def read_nifti(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def frames_of(folder):
    return [np.asarray(Image.open(p)) for p in sorted(Path(folder).iterdir())]


def labels_as_predictions(dataset, split, destination):
    """Copy the stored labels into a predictions folder, as nnUNetv2_predict would write them."""
    destination.mkdir()
    for path in (dataset / f"labels{split}").iterdir():
        shutil.copy(path, destination / path.name)
    return destination


def test_round_trip_frames_to_dataset_to_frames(tmp_path):
    train = make_synthetic_videos(tmp_path / "train", n_videos=2, nframes=4, size=(32, 48), seed=0)
    test = make_synthetic_videos(tmp_path / "test", n_videos=1, nframes=3, size=(64, 32), seed=1, prefix="clip")
    dataset = video_to_nnunet(train, tmp_path / "raw", 12, name="Polyps", test_dir=test)
    assert dataset.name == "Dataset012_Polyps"
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # staging folder renamed

    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["numTraining"] == 2
    assert meta["labels"] == {"background": 0, "foreground": 1} and meta["file_ending"] == ".nii.gz"

    # Images: (frames, H, W) per colour channel, time first with the largest spacing (SimpleITK: x, y, z).
    frames = frames_of(train / "frames" / "video01")
    red, spacing = read_nifti(dataset / "imagesTr" / "video01_0000.nii.gz")
    blue, _ = read_nifti(dataset / "imagesTr" / "video01_0002.nii.gz")
    assert red.shape == (4, 32, 48) and spacing == (1.0, 1.0, 10.0)
    np.testing.assert_array_equal(red, np.stack([f[..., 0] for f in frames]))
    np.testing.assert_array_equal(blue, np.stack([f[..., 2] for f in frames]))
    label, _ = read_nifti(dataset / "labelsTr" / "video01.nii.gz")
    masks = frames_of(train / "masks" / "video01")
    np.testing.assert_array_equal(label, np.stack(masks) // 255)
    assert set(np.unique(label)) == {0, 1}

    # Predictions (here: the stored test labels) back to per-frame masks with the original names.
    predictions = labels_as_predictions(dataset, "Ts", tmp_path / "predictions")
    out = predictions_to_frames(predictions, dataset, tmp_path / "exported")
    exported = sorted(p.name for p in (out / "clip00").iterdir())
    assert exported == sorted(p.name for p in (test / "masks" / "clip00").iterdir())
    for name in exported:
        np.testing.assert_array_equal(np.asarray(Image.open(out / "clip00" / name)),
                                      np.asarray(Image.open(test / "masks" / "clip00" / name)))


def test_clips_split_long_videos_and_export_back_into_one_folder(tmp_path):
    source = make_synthetic_videos(tmp_path / "videos", n_videos=1, nframes=7, size=(32, 32))
    dataset = video_to_nnunet(source, tmp_path / "raw", 13, clip_length=3, grayscale=True)
    manifest = json.loads((dataset / MANIFEST_NAME).read_text())
    assert list(manifest["cases"]) == ["video00_clip000", "video00_clip001", "video00_clip002"]
    assert [len(c["frames"]) for c in manifest["cases"].values()] == [3, 3, 1]
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir())[0] == "video00_clip000_0000.nii.gz"
    assert json.loads((dataset / "dataset.json").read_text())["channel_names"] == {"0": "gray"}
    gray, _ = read_nifti(dataset / "imagesTr" / "video00_clip001_0000.nii.gz")
    rgb = frames_of(source / "frames" / "video00")[3].astype(float)
    expected = np.rint(rgb @ [0.299, 0.587, 0.114])
    np.testing.assert_array_equal(gray[0], expected)

    out = predictions_to_frames(labels_as_predictions(dataset, "Tr", tmp_path / "pred"), dataset, tmp_path / "out",
                                foreground_value=1)
    exported = frames_of(out / "video00")
    assert len(exported) == 7
    np.testing.assert_array_equal(np.stack(exported), np.stack(frames_of(source / "masks" / "video00")) // 255)


def test_video_file_input(tmp_path):
    import imageio.v3 as iio

    source = make_synthetic_videos(tmp_path / "folders", n_videos=1, nframes=4, size=(32, 32))
    videos = tmp_path / "files"
    (videos / "frames").mkdir(parents=True)
    iio.imwrite(videos / "frames" / "movie.gif", np.stack(frames_of(source / "frames" / "video00")))
    shutil.copytree(source / "masks" / "video00", videos / "masks" / "movie")
    for index, path in enumerate(sorted((videos / "masks" / "movie").iterdir())):
        path.rename(path.with_name(f"{index:05d}.png"))  # frames of a video file are named 00000, 00001, ...
    dataset = video_to_nnunet(videos, tmp_path / "raw", 14)
    image, _ = read_nifti(dataset / "imagesTr" / "movie_0000.nii.gz")
    assert image.shape == (4, 32, 32)
    assert json.loads((dataset / MANIFEST_NAME).read_text())["cases"]["movie"]["frames"][-1] == "00003"


def test_unreadable_video_file_names_the_fix(tmp_path):
    (tmp_path / "v" / "frames").mkdir(parents=True)
    (tmp_path / "v" / "masks" / "clip").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "v" / "masks" / "clip" / "00000.png")
    (tmp_path / "v" / "frames" / "clip.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoDataError, match=r"clip\.mp4.*(imageio\[ffmpeg\]|OpenCV)"):
        video_to_nnunet(tmp_path / "v", tmp_path / "raw", 15)
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir())


def _videos(tmp_path, **kwargs):
    return make_synthetic_videos(tmp_path / "videos", n_videos=2, nframes=3, size=(32, 32), **kwargs)


def _assert_nothing_written(raw_root):
    assert not raw_root.exists() or list(raw_root.iterdir()) == []  # no dataset, no staging leftovers


def test_frames_of_different_sizes(tmp_path):
    source = _videos(tmp_path)
    Image.new("RGB", (40, 32)).save(source / "frames" / "video01" / "0002.png")
    with pytest.raises(VideoDataError, match=r"video01.*0002\.png is 32x40.*one size"):
        video_to_nnunet(source, tmp_path / "raw", 20)
    _assert_nothing_written(tmp_path / "raw")


def test_missing_masks(tmp_path):
    source = _videos(tmp_path)
    (source / "masks" / "video00" / "0001.png").unlink()
    with pytest.raises(VideoDataError, match=r"video00.*no mask.*0001"):
        video_to_nnunet(source, tmp_path / "raw", 21)
    shutil.rmtree(source / "masks" / "video00")
    with pytest.raises(VideoDataError, match=r"No masks for video\(s\) \['video00'\]"):
        video_to_nnunet(source, tmp_path / "raw", 21)
    shutil.rmtree(source / "masks")
    with pytest.raises(VideoDataError, match="no masks/ folder"):
        video_to_nnunet(source, tmp_path / "raw", 21)
    _assert_nothing_written(tmp_path / "raw")


def test_non_binary_masks_need_a_threshold(tmp_path):
    source = _videos(tmp_path)
    mask_path = source / "masks" / "video01" / "0000.png"
    soft = np.asarray(Image.open(mask_path)).copy()
    soft[0, :4] = [1, 100, 200, 254]  # anti-aliased edge
    Image.fromarray(soft).save(mask_path)
    with pytest.raises(VideoDataError, match=r"0000\.png is not binary.*--mask-threshold"):
        video_to_nnunet(source, tmp_path / "raw", 22)
    _assert_nothing_written(tmp_path / "raw")
    dataset = video_to_nnunet(source, tmp_path / "raw", 22, mask_threshold=128)
    label, _ = read_nifti(dataset / "labelsTr" / "video01.nii.gz")
    np.testing.assert_array_equal(label[0, 0, :4], [0, 0, 1, 1])


def test_colour_masks_and_mask_size_mismatch(tmp_path):
    source = _videos(tmp_path)
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(source / "masks" / "video00" / "0000.png")
    with pytest.raises(VideoDataError, match="colour image"):
        video_to_nnunet(source, tmp_path / "raw", 23)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(source / "masks" / "video00" / "0000.png")
    with pytest.raises(VideoDataError, match="different sizes|frame size"):
        video_to_nnunet(source, tmp_path / "raw", 23)


def test_existing_dataset_and_export_folders_are_not_overwritten(tmp_path):
    source = _videos(tmp_path)
    dataset = video_to_nnunet(source, tmp_path / "raw", 24)
    with pytest.raises(FileExistsError, match="already"):
        video_to_nnunet(source, tmp_path / "raw", 24, name="Other")
    predictions = labels_as_predictions(dataset, "Tr", tmp_path / "pred")
    out = predictions_to_frames(predictions, dataset, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        predictions_to_frames(predictions, dataset, out)
    predictions_to_frames(predictions, dataset, out, foreground_value=1, overwrite=True)
    assert np.asarray(Image.open(next((out / "video00").iterdir()))).max() <= 1
    # A prediction that does not fit its case: error, and the previous export is left untouched.
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.uint8)), str(predictions / "video01.nii.gz"))
    with pytest.raises(VideoDataError, match=r"shape \(2, 8, 8\).*\(3, 32, 32\)"):
        predictions_to_frames(predictions, dataset, out, overwrite=True)
    assert len(list((out / "video01").iterdir())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_video_convert_export_evaluate(tmp_path, capsys):
    source = _videos(tmp_path)
    raw = tmp_path / "raw"
    assert main(["video", "convert", str(source), "-d", "25", "--name", "Cli", "--raw-root", str(raw)]) == 0
    dataset = raw / "Dataset025_Cli"
    predictions = labels_as_predictions(dataset, "Tr", tmp_path / "pred")
    assert main(["video", "export", str(predictions), "--dataset", str(dataset), "-o", str(tmp_path / "out")]) == 0
    assert main(["video", "evaluate", str(tmp_path / "out"), "-r", str(source / "masks"), "-o",
                 str(tmp_path / "metrics"), "--inference-seconds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "video00" in printed and "FPS: 3.0" in printed  # 6 frames in 2 s
    assert (tmp_path / "metrics" / "video_metrics.json").is_file()
    # Bad input -> exit code 2 and a message, not a traceback.
    assert main(["video", "convert", str(tmp_path / "missing"), "-d", "26", "--raw-root", str(raw)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gray_and_colour_frames_mixed_in_one_video(tmp_path):
    source = _videos(tmp_path)
    Image.new("L", (32, 32)).save(source / "frames" / "video00" / "0001.png")
    with pytest.raises(VideoDataError, match=r"mixes gray and colour.*--grayscale"):
        video_to_nnunet(source, tmp_path / "raw", 27)
    dataset = video_to_nnunet(source, tmp_path / "raw", 27, grayscale=True)
    assert read_nifti(dataset / "imagesTr" / "video00_0000.nii.gz")[0].shape == (3, 32, 32)
    assert not (dataset / "imagesTr" / "video00_0001.nii.gz").exists()
