"""The training log and debug.json say what trains: network class, parameters, scan backend, precision."""
import json
from pathlib import Path

import pytest
import torch

from nnunetv2_mamba.network_architectures.vivim import STMambaV3, Vivim
from nnunetv2_mamba.trainers.base import describe_scan_backends, precision_policy
from nnunetv2_mamba.trainers.umamba import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBotNoAMP
from tests.builders import make_trainer
from tests.trainers.test_umamba import DATASET_JSON, make_plans


def log_text(trainer):
    return Path(trainer.log_file).read_text()


@pytest.mark.parametrize("trainer_class,precision", [(nnUNetTrainerUMambaBot, "fp32 (nnU-Net uses no autocast"),
                                                     (nnUNetTrainerUMambaBotNoAMP, "NoAMP fp32")])
def test_log_and_debug_json_name_the_network_that_trains(trainer_class, precision, tmp_path, monkeypatch):
    monkeypatch.delenv("NNUNETV2_MAMBA_BACKEND", raising=False)
    trainer = make_trainer(trainer_class, make_plans(), "3d_fullres", DATASET_JSON, tmp_path, monkeypatch)
    trainer.print_plans()  # what on_train_start calls, after the network is built
    trainer._save_debug_information()
    n_parameters = sum(p.numel() for p in trainer.network.parameters())
    n_scans = sum(1 for m in trainer.network.modules() if hasattr(m, "A_log"))
    assert n_scans >= 1
    log = log_text(trainer)
    # nnU-Net's own printout names the plans' network; ours follows it and names the built one.
    assert log.index("PlainConvUNet") < log.index("the network that trains")
    assert "network class:  nnunetv2_mamba.network_architectures.umamba.UMambaBot" in log
    assert f"parameters:     {n_parameters:,} ({n_parameters:,} trainable)" in log
    assert f"scan backend:   torch ({n_scans} selective scan{'s' * (n_scans != 1)}) on cpu (automatic choice)" in log
    assert f"precision:      {precision}" in log

    debug = json.loads((Path(trainer.output_folder) / "debug.json").read_text())
    assert debug["network_class"] == "nnunetv2_mamba.network_architectures.umamba.UMambaBot"
    assert debug["network_parameters"] == n_parameters
    assert debug["scan_backend"].startswith("torch (")
    assert debug["precision"].startswith(precision)
    assert debug["network"] == "UMambaBot" and "device" in debug  # nnU-Net's own entries are kept


def test_a_forced_backend_that_cannot_run_is_reported(tmp_path, monkeypatch):
    trainer = make_trainer(nnUNetTrainerUMambaBot, make_plans(), "3d_fullres", DATASET_JSON, tmp_path, monkeypatch)
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "mamba_ssm")
    text = describe_scan_backends(trainer.network, torch.device("cpu"), torch.float32)
    assert "selective scan(s) cannot run" in text and "'mamba_ssm' was requested" in text
    monkeypatch.setenv("NNUNETV2_MAMBA_BACKEND", "torch")
    assert describe_scan_backends(trainer.network, torch.device("cpu"), torch.float32).endswith(
        "on cpu (forced by $NNUNETV2_MAMBA_BACKEND=torch)")
    assert describe_scan_backends(torch.nn.Linear(2, 2), torch.device("cpu"), torch.float32).startswith("none")


def test_every_branch_of_st_mamba_v3_counts_as_a_scan(monkeypatch):
    monkeypatch.delenv("NNUNETV2_MAMBA_BACKEND", raising=False)
    network = Vivim(1, 2, 2, mixer="st_v3", embed_dims=(8, 16, 24, 32), mit_depths=(1, 1, 1, 1),
                    num_heads=(1, 2, 2, 4), tmb_depths=(1, 1, 1, 1), decoder_dim=16)
    n_layers = sum(isinstance(m, STMambaV3) for m in network.modules())
    assert n_layers == 4
    assert describe_scan_backends(network, torch.device("cpu"), torch.float32) == \
        f"torch ({3 * n_layers} selective scans) on cpu (automatic choice)"


def test_precision_policy_per_device_and_variant(monkeypatch):
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "fp32")
    assert precision_policy("cuda", no_amp=False).startswith("fp16 AMP (autocast + GradScaler), Mamba mixers in fp32")
    monkeypatch.setenv("NNUNETV2_MAMBA_MIXER_DTYPE", "bf16")
    assert "Mamba mixers under bf16 autocast" in precision_policy("cuda", no_amp=False)
    assert precision_policy("cpu", no_amp=False).startswith("fp32")
    assert "mixers under autocast" in precision_policy("cuda", no_amp=False, mixers_fp32=False)
    assert precision_policy("cuda", no_amp=True).startswith("NoAMP fp32")
    assert precision_policy("cpu", no_amp=False) == "fp32 (nnU-Net uses no autocast and no GradScaler on cpu)"
