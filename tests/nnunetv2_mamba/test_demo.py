"""The README's first set-up command: `nnunetv2_mamba demo` runs nnU-Net's whole pipeline in one folder."""
import pytest

from nnunetv2_mamba import cli
from nnunetv2_mamba.demo import run_demo


@pytest.mark.e2e
def test_demo_runs_the_pipeline_and_reports_dice(tmp_path, monkeypatch, capsys):
    # The demo must not need nnU-Net's variables; it sets them for its folder. Registering each with
    # monkeypatch (set, then delete) restores the original state after the test, whatever the demo set.
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_def_n_proc",
                     "nnUNet_n_proc_DA"):
        monkeypatch.setenv(variable, "unset-by-test")
        monkeypatch.delenv(variable)
    result = run_demo(tmp_path / "demo", epochs=1, iterations=1, device="cpu", shape=(16, 16, 16))
    assert (result.results_dir / "fold_0" / "checkpoint_final.pth").is_file()
    assert sorted(p.name for p in result.predictions_dir.glob("*.nii.gz")) == ["case_ts000.nii.gz",
                                                                               "case_ts001.nii.gz"]
    assert 0.0 <= result.summary["foreground_mean"]["Dice"] <= 1.0
    assert set(result.timings) == {"dataset", "plan_and_preprocess", "train", "validate", "predict", "evaluate"}
    # The CLI wrapper prints the report (the prepared data are reused: no second planning).
    code = cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--iterations", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "Dice foreground mean:" in out and "plan_and_preprocess" in out


def test_demo_rejects_bad_arguments_before_doing_anything(tmp_path):
    with pytest.raises(ValueError, match="epochs and iterations must be >= 1"):
        run_demo(tmp_path / "demo", iterations=0)
    assert not (tmp_path / "demo").exists()
