"""nnunetv2_mamba compare on synthetic nnU-Net results trees (summary.json written by nnU-Net's own writer)."""
import csv
import json
import math

import numpy as np
import pytest
from nnunetv2.evaluation.evaluate_predictions import save_summary_json
from scipy.stats import wilcoxon

from nnunetv2_mamba import cli
from nnunetv2_mamba.compare import CompareError, benchmark_network_for, build_comparison, holm, write_outputs
from nnunetv2_mamba.compare.outputs import format_markdown

DATASET = "Dataset042_Toy"
PLANS, CONFIGURATION = "nnUNetPlans", "3d_fullres"
CASES = [f"toy_{i:03d}" for i in range(10)]


def _metrics(dice: float) -> dict:
    """nnU-Net's per-label metrics for a Dice value (TP/FP/FN chosen to give it; NaN: empty ref and pred)."""
    if math.isnan(dice):
        return {"Dice": float("nan"), "IoU": float("nan"), "TP": 0, "FP": 0, "FN": 0, "TN": 100, "n_pred": 0,
                "n_ref": 0}
    tp = int(round(dice * 100))
    fp = fn = 100 - tp
    return {"Dice": 2 * tp / (2 * tp + fp + fn), "IoU": tp / (tp + fp + fn), "TP": tp, "FP": fp, "FN": fn,
            "TN": 1000, "n_pred": tp + fp, "n_ref": tp + fn}


def write_fold(results_root, trainer, fold, dice_by_case, plans=PLANS, configuration=CONFIGURATION):
    """Write fold_K/validation/summary.json with nnU-Net's save_summary_json; dice_by_case: {case: {label: d}}."""
    folder = results_root / DATASET / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    per_case = [{"reference_file": f"/gt/{case}.nii.gz", "prediction_file": str(folder / f"{case}.nii.gz"),
                 "metrics": {label: _metrics(d) for label, d in labels.items()}}
                for case, labels in dice_by_case.items()]
    labels = list(next(iter(dice_by_case.values())))
    means = {label: {m: float(np.nanmean([c["metrics"][label][m] for c in per_case])) for m in
                     per_case[0]["metrics"][label]} for label in labels}
    foreground = {m: float(np.mean([means[label][m] for label in labels])) for m in means[labels[0]]}
    save_summary_json({"metric_per_case": per_case, "mean": means, "foreground_mean": foreground},
                      str(folder / "summary.json"))


def write_dataset_json(results_root, trainer, labels, plans=PLANS, configuration=CONFIGURATION, **extra):
    folder = results_root / DATASET / f"{trainer}__{plans}__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz", **extra}))


def make_tree(tmp_path, dice, folds_of=None, label_names=None):
    """dice: {trainer: {case: {label: value}}}; folds_of: {trainer: {case: fold}} (default: case index % 5)."""
    root = tmp_path / "results"
    for trainer, cases in dice.items():
        fold_of = (folds_of or {}).get(trainer) or {case: CASES.index(case) % 5 for case in cases}
        for fold in sorted(set(fold_of.values())):
            write_fold(root, trainer, fold, {c: cases[c] for c in cases if fold_of[c] == fold})
        write_dataset_json(root, trainer, label_names or {"background": 0, "liver": 1, "tumour": 2})
    return root


def random_dice(seed, shift=0.0, labels=(1, 2)):
    rng = np.random.default_rng(seed)
    return {case: {label: float(np.clip(rng.uniform(0.5, 0.9) + shift, 0, 1)) for label in labels}
            for case in CASES}


def rows_by(comparison, trainer):
    return {row["label"]: row for row in comparison.per_class if row["trainer"] == trainer}


def test_holm_matches_a_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1 and monotone: 0.5*2 = 1.0, 0.6*1 = 0.6 -> 1.0
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    adjusted = holm([float("nan"), 0.02, 0.04])  # NaN is no test: m = 2
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.04, 0.04])


def test_statistics_pool_the_folds_and_pair_by_case(tmp_path):
    base, mamba, other = random_dice(0), random_dice(1, shift=0.05), random_dice(2, shift=-0.1)
    # The second trainer lists its cases in another order and under other folds: pairing must use the case id.
    shuffled = {case: i % 5 for i, case in enumerate(reversed(CASES))}
    root = make_tree(tmp_path, {"nnUNetTrainer": base, "nnUNetTrainerUMambaBot": mamba,
                                "nnUNetTrainerSegMamba": other},
                     folds_of={"nnUNetTrainerUMambaBot": shuffled})
    comparison = build_comparison("42", CONFIGURATION, ["nnUNetTrainer", "nnUNetTrainerUMambaBot",
                                                        "nnUNetTrainerSegMamba"], results_folder=str(root))
    assert comparison.baseline == "nnUNetTrainer" and comparison.labels == ["1", "2"]
    assert comparison.fold_of_case["nnUNetTrainerUMambaBot"]["toy_009"] == 0
    p_values = []
    for trainer, dice in (("nnUNetTrainerUMambaBot", mamba), ("nnUNetTrainerSegMamba", other)):
        for label, row in rows_by(comparison, trainer).items():
            values = np.array([_metrics(dice[c][int(label)])["Dice"] for c in CASES])
            reference = np.array([_metrics(base[c][int(label)])["Dice"] for c in CASES])
            assert row["n_cases"] == row["n_pairs"] == 10
            assert row["mean_dice"] == pytest.approx(values.mean())
            assert row["sd_dice"] == pytest.approx(values.std(ddof=1))
            assert row["mean_diff_vs_baseline"] == pytest.approx((values - reference).mean())
            assert row["p_wilcoxon"] == pytest.approx(wilcoxon(values, reference).pvalue)
            p_values.append(row["p_wilcoxon"])
    for row in rows_by(comparison, "nnUNetTrainer").values():
        assert row["p_wilcoxon"] is None and row["p_holm"] is None and row["n_cases"] == 10
    # Holm over the 4 tests of the report, written out by hand.
    order = np.argsort(p_values)
    expected, running = [0.0] * 4, 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * p_values[index]))
        expected[index] = running
    tested = [row for row in comparison.per_class if row["trainer"] != "nnUNetTrainer"]
    assert [row["p_holm"] for row in tested] == pytest.approx(expected)
    assert [row["name"] for row in tested] == ["liver", "tumour"] * 2


def test_nan_cases_are_left_out_of_means_and_pairs(tmp_path):
    base, mamba = random_dice(0), random_dice(1)
    base["toy_003"][1] = float("nan")  # empty reference and prediction: nnU-Net writes NaN
    root = make_tree(tmp_path, {"nnUNetTrainer": base, "nnUNetTrainerUMambaBot": mamba})
    comparison = build_comparison(DATASET, CONFIGURATION, ["nnUNetTrainer", "nnUNetTrainerUMambaBot"],
                                  results_folder=str(root))
    assert rows_by(comparison, "nnUNetTrainer")["1"]["n_cases"] == 9
    row = rows_by(comparison, "nnUNetTrainerUMambaBot")["1"]
    assert row["n_cases"] == 10 and row["n_pairs"] == 9
    kept = [c for c in CASES if c != "toy_003"]
    assert row["p_wilcoxon"] == pytest.approx(wilcoxon([_metrics(mamba[c][1])["Dice"] for c in kept],
                                                       [_metrics(base[c][1])["Dice"] for c in kept]).pvalue)


def test_regions_get_their_dataset_json_names(tmp_path):
    regions = ((1, 2, 3), (2, 3), (3,))
    names = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    root = tmp_path / "results"
    for seed, trainer in enumerate(("nnUNetTrainer", "nnUNetTrainerUMambaEnc")):
        dice = random_dice(seed, labels=regions)
        for fold in range(5):
            write_fold(root, trainer, fold, {c: dice[c] for c in CASES if CASES.index(c) % 5 == fold})
        write_dataset_json(root, trainer, names, regions_class_order=[1, 2, 3])
    comparison = build_comparison("42", CONFIGURATION, ["nnUNetTrainer", "nnUNetTrainerUMambaEnc"],
                                  results_folder=str(root))
    assert comparison.labels == ["(1, 2, 3)", "(2, 3)", "(3,)"]
    assert [row["name"] for row in comparison.per_class[:3]] == ["whole tumor", "tumor core", "enhancing tumor"]
    written = {path.name for path in write_outputs(comparison, tmp_path / "out")}
    assert {"dice_region_1-2-3.png", "dice_region_2-3.png", "dice_region_3.png"} <= written


def test_missing_fold_is_named_and_partial_marks_every_output(tmp_path, capsys):
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0), "nnUNetTrainerUMambaBot": random_dice(1)})
    summary = root / DATASET / f"nnUNetTrainerUMambaBot__{PLANS}__{CONFIGURATION}" / "fold_3" / "validation"
    (summary / "summary.json").unlink()
    argv = ["compare", "-d", "42", "-c", CONFIGURATION, "-tr", "nnUNetTrainer", "nnUNetTrainerUMambaBot",
            "--results-folder", str(root), "-o", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "nnUNetTrainerUMambaBot fold 3" in error and "--allow-partial" in error
    assert not (tmp_path / "out").exists()

    assert cli.main(argv + ["--allow-partial"]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL REPORT" in out and "nnUNetTrainerUMambaBot fold 3" in out
    with open(tmp_path / "out" / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["partial"] for row in rows} == {"true"}
    mamba_rows = [row for row in rows if row["trainer"] == "nnUNetTrainerUMambaBot"]
    assert {row["n_cases"] for row in mamba_rows} == {"8"} and {row["n_pairs"] for row in mamba_rows} == {"8"}
    with open(tmp_path / "out" / "other_metrics.csv") as handle:
        assert {row["partial"] for row in csv.DictReader(handle)} == {"true"}
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert report["partial"] is True and any("fold 3" in m for m in report["missing"])
    assert "PARTIAL REPORT" in (tmp_path / "out" / "index.html").read_text()


def test_a_missing_case_is_named(tmp_path):
    mamba = random_dice(1)
    del mamba["toy_007"]
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0), "nnUNetTrainerUMambaBot": mamba})
    trainers = ["nnUNetTrainer", "nnUNetTrainerUMambaBot"]
    with pytest.raises(CompareError, match="nnUNetTrainerUMambaBot has no result for 1 case.*toy_007"):
        build_comparison("42", CONFIGURATION, trainers, results_folder=str(root))
    comparison = build_comparison("42", CONFIGURATION, trainers, results_folder=str(root), allow_partial=True)
    assert comparison.partial and rows_by(comparison, "nnUNetTrainerUMambaBot")["2"]["n_pairs"] == 9
    assert rows_by(comparison, "nnUNetTrainer")["2"]["n_cases"] == 10


def test_misspelled_trainer_gets_a_suggestion_and_exit_code_2(tmp_path, capsys):
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0), "nnUNetTrainerUMambaBot": random_dice(1)})
    code = cli.main(["compare", "-d", "42", "-c", CONFIGURATION, "-tr", "nnUNetTrainer", "nnUNetTrainerUMambaBott",
                     "--results-folder", str(root), "-o", str(tmp_path / "out"), "--allow-partial"])
    error = capsys.readouterr().err
    assert code == 2 and "No results for trainer nnUNetTrainerUMambaBott" in error
    assert "did you mean nnUNetTrainerUMambaBot?" in error and len(error.strip().splitlines()) == 1


def test_trainer_with_other_plans_is_pointed_at(tmp_path):
    root = tmp_path / "results"
    for trainer, plans in (("nnUNetTrainer", PLANS), ("nnUNetTrainerUMambaBot", "nnUNetResEncUNetMPlans")):
        for fold in range(5):
            write_fold(root, trainer, fold, {c: {1: 0.8} for c in CASES if CASES.index(c) % 5 == fold}, plans=plans)
    with pytest.raises(CompareError, match="plans/configuration nnUNetResEncUNetMPlans 3d_fullres"):
        build_comparison("42", CONFIGURATION, ["nnUNetTrainer", "nnUNetTrainerUMambaBot"], results_folder=str(root))


def test_overlapping_folds_and_different_labels_are_errors(tmp_path):
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0)})
    write_fold(root, "nnUNetTrainer", 4, {"toy_000": {1: 0.5, 2: 0.5}})  # toy_000 is fold 0's
    with pytest.raises(CompareError, match="toy_000 is validated by fold 0 and fold 4"):
        build_comparison("42", CONFIGURATION, ["nnUNetTrainer"], results_folder=str(root))
    root = make_tree(tmp_path / "b", {"nnUNetTrainer": random_dice(0), "nnUNetTrainerVivim": random_dice(1, labels=(1,))})
    with pytest.raises(CompareError, match="not evaluated on the same labels"):
        build_comparison("42", CONFIGURATION, ["nnUNetTrainer", "nnUNetTrainerVivim"], results_folder=str(root))


def test_bad_fold_and_unknown_dataset_exit_non_zero(tmp_path, capsys):
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0)})
    base = ["compare", "-c", CONFIGURATION, "-tr", "nnUNetTrainer", "--results-folder", str(root),
            "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        cli.main(base + ["-d", "42", "-f", "all"])
    assert stopped.value.code == 2 and "'all' has no held-out cases" in capsys.readouterr().err
    assert cli.main(base + ["-d", "43"]) == 2
    error = capsys.readouterr().err
    assert "No results for dataset 43" in error and "(present: Dataset042_Toy)" in error


def test_cli_writes_csv_json_html_pngs_and_compute_side(tmp_path, capsys):
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0), "nnUNetTrainerUMambaBotNoAMP": random_dice(1),
                                "nnUNetTrainerVivim": random_dice(2)})
    benchmark = tmp_path / "bench.json"
    benchmark.write_text(json.dumps({"info": "device: H100, patch [128, 128, 128]", "rows": [
        {"network": "PlainConvUNet", "params_m": 31.2, "train_ms": 72.0, "train_peak_gib": 4.7, "infer_ms": 15.0},
        {"network": "UMambaBot", "params_m": 40.1, "train_ms": 90.0, "train_peak_gib": 6.0, "infer_ms": 20.0}]}))
    out = tmp_path / "out"
    code = cli.main(["compare", "-d", DATASET, "-c", CONFIGURATION, "-tr", "nnUNetTrainerUMambaBotNoAMP",
                     "nnUNetTrainerVivim", "--baseline", "nnUNetTrainer", "--results-folder", str(root),
                     "-o", str(out), "--benchmark-json", str(benchmark)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| nnUNetTrainerVivim | 2 | tumour |" in printed and "PARTIAL" not in printed
    with open(out / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer"] * 2 + ["nnUNetTrainerUMambaBotNoAMP"] * 2 + \
        ["nnUNetTrainerVivim"] * 2
    assert rows[0]["p_wilcoxon"] == rows[0]["p_holm"] == "" and float(rows[2]["p_holm"]) >= float(rows[2]["p_wilcoxon"])
    with open(out / "other_metrics.csv") as handle:
        metrics = {row["metric"] for row in csv.DictReader(handle)}
    assert metrics == {"IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref"}
    report = json.loads((out / "comparison.json").read_text())
    assert report["per_case_dice"]["nnUNetTrainerVivim"]["toy_004"]["1"] == pytest.approx(
        _metrics(random_dice(2)["toy_004"][1])["Dice"])
    compute = {row["trainer"]: row for row in report["compute"]}
    assert compute["nnUNetTrainer"]["params_m"] == 31.2 and compute["nnUNetTrainerUMambaBotNoAMP"]["infer_ms"] == 20.0
    assert compute["nnUNetTrainerVivim"]["params_m"] is None and "not in the benchmark" in compute["nnUNetTrainerVivim"]["note"]
    page = (out / "index.html").read_text()
    for name in ("dice_label_1.png", "dice_label_2.png"):
        assert f"src='{name}'" in page
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "device: H100" in page and "40.1" in page
    assert not list(out.glob(".*.tmp"))


def test_benchmark_network_names_for_trainers():
    networks = ["PlainConvUNet", "SegMamba", "SegMambaSkip", "UMambaBot", "LoGVMamba", "Vivim", "VivimV3"]
    assert benchmark_network_for("nnUNetTrainer", networks) == "PlainConvUNet"
    assert benchmark_network_for("nnUNetTrainer_250epochs", networks) == "PlainConvUNet"
    assert benchmark_network_for("nnUNetTrainerSegMambaSkipPeriodicLR", networks) == "SegMambaSkip"
    assert benchmark_network_for("nnUNetTrainerSegMambaNNUNetRecipe", networks) == "SegMamba"
    assert benchmark_network_for("nnUNetTrainerVivimV3", networks) == "VivimV3"
    assert benchmark_network_for("nnUNetTrainerLoGVMambaPaperRecipe", networks) == "LoGVMamba"
    assert benchmark_network_for("nnUNetTrainerGVMamba", networks) is None


def test_markdown_of_a_comparison_lists_every_row(tmp_path):
    root = make_tree(tmp_path, {"nnUNetTrainer": random_dice(0), "nnUNetTrainerUMambaBot": random_dice(1)})
    comparison = build_comparison("42", CONFIGURATION, ["nnUNetTrainer", "nnUNetTrainerUMambaBot"],
                                  results_folder=str(root))
    table = [line for line in format_markdown(comparison).splitlines() if line.startswith("| nnUNetTrainer")]
    assert len(table) == 4 + 2  # 2 trainers x 2 labels, then the foreground-mean table
