"""The nnunetv2_mamba command: list, doctor, demo, and clear errors."""
import subprocess
import sys

import pytest

from nnunetv2_mamba import cli
from nnunetv2_mamba.trainers.discovery import concrete_trainers


def test_list_prints_every_trainer_with_network_and_dims(capsys):
    trainers = concrete_trainers()
    code = cli.main(["list"])
    out = capsys.readouterr().out
    if not trainers:
        assert code == 1 and "No trainers found" in out
        return
    assert code == 0
    table, note = out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["trainer", "network", "dims"]
    assert len(lines) == len(trainers) + 1  # the short-schedule variants are mentioned, not listed
    assert "_5epochs" not in table and "T_1epoch, T_5epochs" in note and f"({7 * len(trainers)} trainers)" in note
    for name, cls in trainers:
        line = next(line for line in lines if line.split()[0] == name)
        assert cls.network_family in line
        assert line.split()[-1] == "/".join(f"{d}D" for d in cls.supported_dims)


def test_doctor_warns_with_fixes_when_nnunet_paths_are_missing_but_passes(monkeypatch, capsys, tmp_path):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "missing"))
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert code == (0 if concrete_trainers() else 1), out  # missing folders do not stop training
    assert "[warn] nnUNet_raw is not set" in out and "fix: export nnUNet_raw=" in out
    assert f"[warn] nnUNet_results={tmp_path / 'missing'} does not exist" in out and "[FAIL]" not in out
    assert "3 warning(s)" in out
    assert "torch: available" in out and "chosen for fp32 tensors on cpu: torch" in out
    assert "chosen for d_state 128 (the SegMamba family) on cpu: torch" in out
    assert "chosen for such sequences with d_state 64 on cpu: torch" in out
    assert "nnunetv2 2.8" in out


def test_doctor_passes_when_everything_needed_is_there(monkeypatch, capsys, tmp_path):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert code == (0 if concrete_trainers() else 1), out
    if concrete_trainers():
        assert "nnU-Net finds" in out and "Everything needed to train is in place." in out and "[warn]" not in out


def test_doctor_reports_a_forced_unavailable_backend(monkeypatch, capsys):
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "mamba_ssm")
    cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "[FAIL] Selective-scan backend 'mamba_ssm' was requested" in out


def test_doctor_reports_the_mixer_precision_and_a_bad_setting(monkeypatch, capsys):
    monkeypatch.delenv("NNUNETV2_MAMBA_MIXER_DTYPE", raising=False)
    cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "Mamba mixer precision" in out and "fp32 (nnU-Net trains without autocast on the CPU)" in out
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "fp16")
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] $NNUNETV2_MAMBA_MIXER_DTYPE='fp16' is not a mixer precision" in out


def test_doctor_reports_the_memory_format_and_a_bad_setting(monkeypatch, capsys):
    monkeypatch.delenv("NNUNETV2_MAMBA_CHANNELS_LAST", raising=False)
    cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "Feature-map memory format" in out and "contiguous (channels last is used for 3D maps on a GPU)" in out
    monkeypatch.setenv("NNUNETV2_MAMBA_CHANNELS_LAST", "yes")
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] $NNUNETV2_MAMBA_CHANNELS_LAST='yes' is not a choice" in out


def test_console_script_is_installed_and_reports_bad_arguments():
    completed = subprocess.run([sys.executable, "-m", "nnunetv2_mamba.cli", "demo", "--epochs", "0"],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert "error: --epochs must be >= 1; got 0." in completed.stderr
    assert "Traceback" not in completed.stderr
