"""nnunetv2_mamba cluster slurm/local: valid shell, directives, task mapping run with stub commands, errors."""
import os
import subprocess

import pytest

from nnunetv2_mamba import cli
from nnunetv2_mamba.cluster import ClusterError, validate_tasks

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerUMambaBot"]


def stub_bin(tmp_path, log, fail_fold=None):
    """A bin/ folder with nnUNetv2_train, nnunetv2_mamba and sbatch stubs that append their arguments to log."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    fail = f'[ "$3" = "{fail_fold}" ] && exit 3\n' if fail_fold is not None else ""
    scripts = {
        "nnUNetv2_train": f'#!/bin/bash\n{fail}echo "train gpu=${{CUDA_VISIBLE_DEVICES:-}} $*" >> {log}\n',
        "nnunetv2_mamba": f'#!/bin/bash\necho "nnunetv2_mamba $*" >> {log}\n',
        # sbatch --parsable prints "jobid;cluster"; the array gets job 111, the next one 222
        "sbatch": (f'#!/bin/bash\necho "sbatch $*" >> {log}\n'
                   'if [[ "$*" == *train_array.sbatch* ]]; then echo "111;cluster"; else echo 222; fi\n'),
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run_script(path, tmp_path, bin_folder, **env):
    environment = {"PATH": f"{bin_folder}:/usr/bin:/bin", "HOME": str(tmp_path),
                   **{name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
                   **env}
    return subprocess.run(["bash", str(path)], env=environment, capture_output=True, text=True, timeout=60)


def slurm(tmp_path, *extra, folds=("0", "1", "2", "3", "4")):
    out = tmp_path / "jobs"
    code = cli.main(["cluster", "slurm", "-d", "42", "-c", "3d_fullres", "-tr", *TRAINERS, "-f", *folds,
                     "-o", str(out), *extra])
    assert code == 0
    return out


def test_slurm_scripts_are_valid_shell_and_carry_the_directives(tmp_path):
    out = slurm(tmp_path, "--gpus", "2", "--cpus", "12", "--mem", "96G", "--time", "2-00:00:00", "--partition",
                "a100", "--account", "lab", "--array-limit", "4", "--npz", "--setup", "module load cuda")
    assert sorted(p.name for p in out.iterdir()) == ["compare.sbatch", "logs", "submit.sh", "train_array.sbatch"]
    for name in ("compare.sbatch", "submit.sh", "train_array.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / name)]).returncode == 0
        assert os.access(out / name, os.X_OK)
    train = (out / "train_array.sbatch").read_text().splitlines()
    for directive in ("--array=0-9%4", "--gres=gpu:2", "--cpus-per-task=12", "--mem=96G", "--time=2-00:00:00",
                      "--partition=a100", "--account=lab", f"--output={out.absolute()}/logs/train_%A_%a.out"):
        assert f"#SBATCH {directive}" in train
    assert train[0] == "#!/bin/bash" and all(line.startswith("#") for line in train[:12])
    assert "module load cuda" in train
    command = train[-1]
    assert command.startswith("nnUNetv2_train 42 3d_fullres") and "-num_gpus 2" in command and "--npz" in command
    compare = (out / "compare.sbatch").read_text()
    assert "#SBATCH --partition=a100" in compare and "#SBATCH --mem=8G" in compare and "gres" not in compare


def test_single_gpu_tasks_do_not_pass_num_gpus(tmp_path):
    command = (slurm(tmp_path) / "train_array.sbatch").read_text().splitlines()[-1]
    assert "-num_gpus" not in command and "--npz" not in command and "#SBATCH --gres=gpu:1" in \
        (tmp_path / "jobs" / "train_array.sbatch").read_text()


def test_array_index_selects_each_trainer_and_fold_once(tmp_path):
    out = slurm(tmp_path, "--continue-training")
    log = tmp_path / "calls.log"
    bin_folder = stub_bin(tmp_path, log)
    for index in range(10):
        completed = run_script(out / "train_array.sbatch", tmp_path, bin_folder, SLURM_ARRAY_TASK_ID=str(index))
        assert completed.returncode == 0, completed.stderr
    calls = log.read_text().splitlines()
    expected = [f"train gpu= 42 3d_fullres {fold} -tr {trainer} -p nnUNetPlans --c"
                for trainer in TRAINERS for fold in range(5)]
    assert calls == expected
    outside = run_script(out / "train_array.sbatch", tmp_path, bin_folder, SLURM_ARRAY_TASK_ID="10")
    assert outside.returncode != 0 and "array task 10 is out of range 0-9" in outside.stderr
    no_slurm = run_script(out / "train_array.sbatch", tmp_path, bin_folder)
    assert no_slurm.returncode != 0 and "SLURM_ARRAY_TASK_ID" in no_slurm.stderr
    no_results = run_script(out / "train_array.sbatch", tmp_path, bin_folder, SLURM_ARRAY_TASK_ID="0",
                            nnUNet_results="")
    assert no_results.returncode != 0 and "nnUNet_results" in no_results.stderr and len(calls) == 10


def test_submit_makes_compare_depend_on_the_array_and_compare_uses_the_cv_folds(tmp_path):
    out = slurm(tmp_path, "--baseline", "nnUNetTrainerUMambaBot", folds=("0", "1", "all"))
    log = tmp_path / "calls.log"
    bin_folder = stub_bin(tmp_path, log)
    completed = run_script(out / "submit.sh", tmp_path, bin_folder)
    assert completed.returncode == 0, completed.stderr
    assert log.read_text().splitlines() == ["sbatch --parsable train_array.sbatch",
                                            "sbatch --parsable --dependency=afterok:111 compare.sbatch"]
    assert "--array=0-5" in (out / "train_array.sbatch").read_text()
    assert run_script(out / "compare.sbatch", tmp_path, bin_folder).returncode == 0
    assert log.read_text().splitlines()[-1] == (
        f"nnunetv2_mamba compare -d 42 -c 3d_fullres -p nnUNetPlans -tr {' '.join(TRAINERS)} -f 0 1 "
        f"-o {out.absolute()}/compare --baseline nnUNetTrainerUMambaBot")


def test_fold_all_alone_writes_no_compare_job(tmp_path):
    out = slurm(tmp_path, folds=("all",))
    assert not (out / "compare.sbatch").exists() and "dependency" not in (out / "submit.sh").read_text()


def test_local_script_runs_one_queue_per_gpu_then_compare(tmp_path):
    out = tmp_path / "local"
    assert cli.main(["cluster", "local", "-d", "42", "-c", "2d", "-tr", *TRAINERS, "--devices", "0", "3",
                     "-o", str(out)]) == 0
    script = out / "train_local.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.read_text().count(") &") == 2 and "wait" in script.read_text()
    log = tmp_path / "calls.log"
    completed = run_script(script, tmp_path, stub_bin(tmp_path, log))
    assert completed.returncode == 0, completed.stderr
    calls = log.read_text().splitlines()
    tasks = [(trainer, fold) for trainer in TRAINERS for fold in range(5)]
    trained = sorted(line for line in calls if line.startswith("train"))
    assert trained == sorted(f"train gpu={'03'[i % 2]} 42 2d {fold} -tr {trainer} -p nnUNetPlans"
                             for i, (trainer, fold) in enumerate(tasks))
    assert calls[-1].startswith("nnunetv2_mamba compare -d 42 -c 2d") and len(calls) == 11
    assert (out / "logs").is_dir()


def test_local_script_reports_a_failed_training_and_skips_compare(tmp_path):
    out = tmp_path / "local"
    assert cli.main(["cluster", "local", "-d", "42", "-c", "2d", "-tr", *TRAINERS, "--devices", "0", "1",
                     "-o", str(out)]) == 0
    log = tmp_path / "calls.log"
    completed = run_script(out / "train_local.sh", tmp_path, stub_bin(tmp_path, log, fail_fold=3))
    assert completed.returncode == 1
    assert "FAILED: nnUNetTrainer fold 3" in completed.stderr and "FAILED: nnUNetTrainerUMambaBot fold 3" in \
        completed.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 8 and not any(call.startswith("nnunetv2_mamba") for call in calls)


@pytest.mark.parametrize("extra, message", [
    (["-f", "5"], "Fold '5' is not one of nnU-Net's folds: use 0-4 or 'all'"),
    (["-f", "-1"], "Fold '-1' is not one of nnU-Net's folds"),
    (["--time", "two days"], "--time 'two days' is not a SLURM time"),
    (["--mem", "lots"], "--mem 'lots' is not a SLURM memory size"),
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["--baseline", "nnUNetTrainerVivim"], "--baseline nnUNetTrainerVivim is not one of the -tr trainers"),
])
def test_bad_slurm_input_is_a_one_line_error(tmp_path, capsys, extra, message):
    out = tmp_path / "jobs"
    code = cli.main(["cluster", "slurm", "-d", "42", "-c", "3d_fullres", "-tr", *TRAINERS, "-o", str(out), *extra])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_no_trainer_is_an_error(tmp_path, capsys):
    with pytest.raises(ClusterError, match="No trainer given"):
        validate_tasks("42", [], ["0"])
    with pytest.raises(ClusterError, match="not a trainer class name"):
        validate_tasks("42", ["nnUNetTrainer; rm -rf /"], ["0"])
    with pytest.raises(SystemExit) as stopped:
        cli.main(["cluster", "slurm", "-d", "42", "-c", "3d_fullres", "-tr", "-o", str(tmp_path)])
    assert stopped.value.code == 2 and "-tr/--trainers: expected at least one argument" in capsys.readouterr().err
    assert cli.main(["cluster", "local", "-d", "42", "-c", "2d", "-tr", "nnUNetTrainer", "--devices", "0", "0",
                     "-o", str(tmp_path / "x")]) == 2
    assert "distinct GPU indices" in capsys.readouterr().err
