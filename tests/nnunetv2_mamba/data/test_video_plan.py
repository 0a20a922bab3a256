"""``nnunetv2_mamba video plan``: adds the Vivim configurations to an existing plans file, atomically."""
import json

import pytest

from nnunetv2_mamba.cli import main
from nnunetv2_mamba.data.video_plan import VIVIM_NETWORK_CLASS, plan_vivim
from nnunetv2_mamba.plans import PlanError
from tests.trainers.test_vivim import DATASET_NAME, planned_plans


def write_planned_dataset(root, fingerprint_spacings=((10.0, 1.0, 1.0), (10.0, 1.0, 1.0))):
    """Write <root>/<dataset>/nnUNetPlans.json and dataset_fingerprint.json as nnU-Net's planner does."""
    folder = root / DATASET_NAME
    folder.mkdir(parents=True)
    plans_file = folder / "nnUNetPlans.json"
    plans_file.write_text(json.dumps(planned_plans(), indent=4))
    (folder / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [list(s) for s in
                                                                              fingerprint_spacings]}))
    return plans_file


def test_cli_adds_the_configurations_and_keeps_the_rest_of_the_file(tmp_path, monkeypatch, capsys):
    plans_file = write_planned_dataset(tmp_path)
    before = json.loads(plans_file.read_text())
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["video", "plan", "-d", "962", "--frames", "4", "--max-inplane", "64"]) == 0
    assert "3d_fullres_vivim" in capsys.readouterr().out
    after = json.loads(plans_file.read_text())
    assert list(after) == list(before)  # key order kept
    assert {k: v for k, v in after.items() if k != "configurations"} == \
        {k: v for k, v in before.items() if k != "configurations"}
    assert {k: after["configurations"][k] for k in before["configurations"]} == before["configurations"]
    vivim = after["configurations"]["3d_fullres_vivim"]
    assert vivim["patch_size"] == [4, 64, 64]
    assert vivim["architecture"]["network_class_name"] == VIVIM_NETWORK_CLASS
    assert vivim["architecture"]["arch_kwargs"]["nframes"] == 4
    assert [p.name for p in plans_file.parent.iterdir() if p.name.startswith(".")] == []
    # Running it again gives the same file (the configurations are replaced, not duplicated).
    first = plans_file.read_text()
    plan_vivim(DATASET_NAME, preprocessed_root=tmp_path, nframes=4, max_inplane=64)
    assert plans_file.read_text() == first


def test_bad_dataset_leaves_the_plans_file_untouched(tmp_path, monkeypatch, capsys):
    plans_file = write_planned_dataset(tmp_path, fingerprint_spacings=((10.0, 1.0, 1.0), (20.0, 1.0, 1.0)))
    before = plans_file.read_text()
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["video", "plan", "-d", "962"]) == 2
    assert "different time spacings" in capsys.readouterr().err
    assert plans_file.read_text() == before


def test_missing_plans_name_the_planning_command(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(PlanError, match="nnUNet_preprocessed is not set"):
        plan_vivim(962)
    with pytest.raises(PlanError, match="nnUNetv2_plan_and_preprocess -d 962 -c 3d_fullres"):
        plan_vivim(962, preprocessed_root=tmp_path)
    (tmp_path / DATASET_NAME).mkdir()
    with pytest.raises(PlanError, match=r"nnUNetPlans.json not found.*nnUNetv2_plan_and_preprocess"):
        plan_vivim(962, preprocessed_root=tmp_path)
