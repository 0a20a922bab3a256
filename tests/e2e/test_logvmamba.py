"""End to end through nnU-Net's own commands on CPU: LoG-VMamba on the tiny shared 3D dataset."""
import json

import pytest
import torch

from tests.e2e.helpers import run_nnunet_pipeline


@pytest.mark.e2e
def test_logvmamba_3d_fullres_plan_train_predict_evaluate(tmp_path):
    # 16^3 images, same dataset id and shape as the U-Mamba and Taming e2e tests: one planning run serves all.
    result = run_nnunet_pipeline(tmp_path, "nnUNetTrainerLoGVMamba", configuration="3d_fullres", dim=3,
                                 dataset_id=951, shape=(16, 16, 16))
    plans = json.loads((result["results_dir"] / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"] >= 3
    fold = result["results_dir"] / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerLoGVMamba_tiny"
    weights = checkpoint["network_weights"]
    # Stage 0 is an LTX stage (frozen one-hot Unfold kernel saved with the weights); deeper stages have GTX.
    unfold = weights["encoder.mamba_layers.0.mamba.self_attention.unfold.weight"]
    assert torch.equal(unfold.flatten(1), torch.eye(27))
    assert any(key.endswith("self_attention.depth_fc.weight") for key in weights)
    assert not any("seg_layers" in key for key in weights)  # no deep-supervision heads
    # Deep supervision was off in nnU-Net's trainer (the network has one output).
    debug = json.loads((fold / "debug.json").read_text())
    assert debug["enable_deep_supervision"] in (False, "False")
    predictions = sorted(result["predictions_dir"].glob("*.nii.gz"))
    assert predictions, "nnUNetv2_predict (which rebuilds the network) wrote no segmentation"
    dice = result["summary"]["foreground_mean"]["Dice"]
    assert 0.0 <= dice <= 1.0
