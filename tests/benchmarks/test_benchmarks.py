"""The benchmark scripts run as users run them (a subprocess, CPU, tiny sizes) and report consistent rows.

They produce BENCHMARKS.md's figures on the GPU; here only their mechanics are checked: every requested row
is measured, ratios are relative to PlainConvUNet of the same run, and the tables are printed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(name, *args, timeout=600):
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True,
                               text=True, cwd=ROOT, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def test_network_benchmark_measures_each_network_in_its_own_process(tmp_path):
    result = tmp_path / "rows.json"
    stdout = run_script("benchmark_networks.py", "--device", "cpu", "--patch", "64", "64", "64", "--batch", "1",
                        "--steps", "1", "--warmup", "0", "--networks", "UMambaBot", "--json", str(result))
    rows = json.loads(result.read_text())["rows"]
    assert [row["network"] for row in rows] == ["PlainConvUNet", "UMambaBot"]
    for row in rows:
        assert "error" not in row, row
        assert row["train_ms"] > 0 and row["infer_ms"] > 0
    baseline, umamba = rows
    assert baseline["train_ms_ratio"] == 1.0
    assert umamba["train_ms_ratio"] == pytest.approx(umamba["train_ms"] / baseline["train_ms"])
    assert umamba["params_m"] == pytest.approx(42.12, abs=0.01)  # the plan: U-Mamba-Bot's size
    assert "one fresh process per network" in stdout
    assert "| UMambaBot | 42.12 |" in stdout


def test_network_benchmark_rejects_an_unknown_network():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark_networks.py"), "--device", "cpu",
                                "--networks", "NoSuchNet"], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode != 0
    assert "Unknown network(s) ['NoSuchNet']" in completed.stderr and "Traceback" not in completed.stderr


def test_scan_benchmark_prints_a_row_per_available_backend():
    stdout = run_script("benchmark_scan.py", "--device", "cpu", "--shapes", "1x256x16", "--steps", "1",
                        "--warmup", "0")
    rows = [line for line in stdout.splitlines() if line.startswith("| 1x256x16 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["torch"]  # the only backend on a CPU
    assert rows[0].rstrip().endswith("| 1.00 |")


def test_layer_saved_bytes_fall_with_the_triton_conv_and_the_fused_function():
    pytest.importorskip("triton")
    stdout = run_script("layer_saved_bytes.py", "--length", "48", "--d-model", "8")
    kept = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")}
    assert set(kept) == {"unfused, torch conv", "unfused, Triton conv", "fused Function"}, stdout
    assert kept["fused Function"] < kept["unfused, Triton conv"] < kept["unfused, torch conv"], kept


def test_vivim_benchmark_reports_frames_per_second(tmp_path):
    result = tmp_path / "fps.json"
    run_script("benchmark_vivim.py", "--device", "cpu", "--frames", "2", "--size", "64", "64", "--repeats", "1",
               "--warmup", "0", "--json", str(result))
    rows = json.loads(result.read_text())["rows"]
    assert [row["mixer"] for row in rows] == ["alternating", "st_v3"]
    for row in rows:
        assert row["fps"] == pytest.approx(2 * 1000 / row["ms_per_clip"], rel=1e-6)


def _fit_module():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import fit_memory_factors

    return fit_memory_factors


def test_memory_factor_fit_reads_calibration_lines_and_balances_the_worst_errors(tmp_path):
    fit = _fit_module()
    log = tmp_path / "calibration.log"
    # The line format calibrate_memory.check prints, plus noise the parser must skip.
    log.write_text("UserWarning: something\n"
                   "UMambaBot      (64, 64, 64)     estimate    1.64 GiB  measured    1.41 GiB  error  +16.4 %\n"
                   "UMambaBot      (16, 128, 128)   estimate    1.66 GiB  measured    1.52 GiB  error   +9.1 %\n"
                   "\n3/3 measurements within +-15 %\n")
    assert fit.read_points("anisotropic", log) == [("UMambaBot", "anisotropic", (64, 64, 64), 1.41),
                                                  ("UMambaBot", "anisotropic", (16, 128, 128), 1.52)]
    rows = [{"state_gib": 0.5, "activation_gib_factor_1": 1.0, "measured_gib": 1.0},
            {"state_gib": 0.5, "activation_gib_factor_1": 3.0, "measured_gib": 2.4}]  # no factor fits both
    factor = fit.minimax_factor(rows)
    errors = [(r["state_gib"] + factor * r["activation_gib_factor_1"]) / r["measured_gib"] - 1 for r in rows]
    # One over- and one under-estimate of the same size: no other factor has a smaller worst error.
    assert errors[0] == pytest.approx(-errors[1], abs=1e-3) and errors[0] > 0
    assert fit.worst_error(rows, factor) < fit.worst_error(rows, factor * 1.05)
    assert fit.worst_error(rows, factor) < fit.worst_error(rows, factor * 0.95)


def test_memory_factor_fit_reads_the_plan_gpu_records(tmp_path):
    """test_plan_gpu.py's ``finished`` lines become fit rows: measured peak, state, and the activations at factor 1
    (the record's over the factor it was planned with, else planned_factors.json's beside the log)."""
    fit = _fit_module()

    def line(trainer, budget, patch, measured, estimate):
        record = {"budget_gib": budget, "peak_allocated_gib": measured, "peak_reserved_gib": measured + 1,
                  "patch_size": patch, "batch_size": 2, "estimate": estimate}
        return f"finished {trainer} {budget} GB: {json.dumps(record)}"

    log = tmp_path / "plan_gpu.log"
    log.write_text("\n".join([
        "." + line("nnUNetTrainerUMambaBot", 40, [224, 192, 192], 37.5,
                   {"family": "U-Mamba-Bot", "state_gib": 0.5, "activation_gib": 30.0, "factor": 0.6}),
        "some training output",
        line("nnUNetTrainerSegMamba", 24, [160, 128, 128], 21.0, {"family": "SegMamba", "state_gib": 0.8,
                                                                  "activation_gib": 19.5})]))
    with pytest.raises(SystemExit, match="no 'factor'.*SegMamba"):  # the planned factor is unknown
        fit.read_memcheck_rows(log)
    (tmp_path / "planned_factors.json").write_text(json.dumps({"factors": {"SegMamba": 0.65}}))
    bot, seg = fit.read_memcheck_rows(log)
    assert (bot["family"], bot["topology"], bot["patch_size"], bot["measured_gib"]) == \
        ("U-Mamba-Bot", "nnunet", [224, 192, 192], 37.5)
    assert bot["activation_gib_factor_1"] == pytest.approx(50.0)
    assert seg["activation_gib_factor_1"] == pytest.approx(19.5 / 0.65)
