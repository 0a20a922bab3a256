"""``nnunetv2_mamba cluster slurm | local``: job scripts for training many trainers x folds, then ``compare``.

``slurm`` writes a SLURM job array (one task per trainer x fold, ``nnUNetv2_train`` with nnU-Net's own
``-num_gpus`` for multi-GPU tasks), a ``compare`` job and ``submit.sh``, which submits the array and the compare
job with an ``afterok`` dependency on it (it starts once every task succeeded). ``local`` writes one script for a
multi-GPU workstation: the tasks are dealt to the GPUs round-robin, each GPU runs its tasks one after the other
(``CUDA_VISIBLE_DEVICES``; one fold per GPU at a time, as nnU-Net recommends), ``wait``, then ``compare``.

Every value that comes from the command line is validated and shell-quoted; ``--setup`` lines (e.g.
``source ~/venv/bin/activate``) are copied into the scripts as they are.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import List, Sequence, Tuple

from nnunetv2_mamba.io import atomic_write

CV_FOLDS = ("0", "1", "2", "3", "4")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # plans identifiers and configurations (3d_fullres)
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_MEMORY = re.compile(r"^\d+[KMGT]?$")
_NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class ClusterError(ValueError):
    """Bad input for the job scripts (the CLI prints the message and exits 2)."""


def validate_tasks(dataset: str, trainers: Sequence[str], folds: Sequence[str]) -> List[Tuple[str, str]]:
    """Return the (trainer, fold) tasks in array order: trainer-major, folds as given."""
    if not re.match(r"^(\d+|Dataset\d{3}_[A-Za-z0-9_.-]+)$", str(dataset)):
        raise ClusterError(f"-d {dataset!r} is neither a dataset id (e.g. 4) nor a name (Dataset004_Hippocampus)")
    if not trainers:
        raise ClusterError("No trainer given: pass one or more trainer class names with -tr")
    for trainer in trainers:
        if not _IDENTIFIER.match(trainer):
            raise ClusterError(f"-tr {trainer!r} is not a trainer class name (letters, digits, underscores)")
    if not folds:
        raise ClusterError("No fold given: pass -f 0 1 2 3 4 (or a subset, or 'all')")
    for fold in folds:
        if fold not in CV_FOLDS and fold != "all":
            raise ClusterError(f"Fold {fold!r} is not one of nnU-Net's folds: use 0-4 or 'all'")
    trainers, folds = list(dict.fromkeys(trainers)), list(dict.fromkeys(folds))
    return [(trainer, fold) for trainer in trainers for fold in folds]


def _check_settings(args: argparse.Namespace) -> None:
    if not _NAME.match(args.plans):
        raise ClusterError(f"-p {args.plans!r} is not a plans identifier (e.g. nnUNetPlans)")
    if not _NAME.match(args.configuration):
        raise ClusterError(f"-c {args.configuration!r} is not a configuration name (e.g. 3d_fullres)")
    if args.baseline and args.baseline not in args.trainers:
        raise ClusterError(f"--baseline {args.baseline} is not one of the -tr trainers")
    for name in ("gpus", "cpus", "array_limit"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ClusterError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    for name in ("time", "compare_time"):
        value = getattr(args, name, None)
        if value is not None and not _SLURM_TIME.match(value):
            raise ClusterError(f"--{name.replace('_', '-')} {value!r} is not a SLURM time (e.g. 48:00:00 or 2-00:00:00)")
    for name in ("mem", "compare_mem"):
        value = getattr(args, name, None)
        if value is not None and not _SLURM_MEMORY.match(value):
            raise ClusterError(f"--{name.replace('_', '-')} {value!r} is not a SLURM memory size (e.g. 64G)")
    for name in ("partition", "account", "compare_partition"):
        value = getattr(args, name, None)
        if value and not re.match(r"^[A-Za-z0-9_.,-]+$", value):
            raise ClusterError(f"--{name.replace('_', '-')} {value!r} is not a SLURM {name.split('_')[-1]} name")


def train_command(args: argparse.Namespace, fold: str, trainer: str) -> str:
    """Return the nnUNetv2_train command line (fold and trainer may be shell variables such as "$FOLD")."""
    command = ["nnUNetv2_train", shlex.quote(str(args.dataset)), shlex.quote(args.configuration), fold,
               "-tr", trainer, "-p", shlex.quote(args.plans)]
    if getattr(args, "gpus", 1) > 1:
        command += ["-num_gpus", str(args.gpus)]  # nnU-Net's DDP: one task, several GPUs
    if args.npz:
        command.append("--npz")
    if args.continue_training:
        command.append("--c")
    return " ".join(command)


def compare_command(args: argparse.Namespace, tasks: Sequence[Tuple[str, str]]) -> str:
    """Return the ``nnunetv2_mamba compare`` command for the cross-validation folds of the tasks ('' if none)."""
    folds = sorted({fold for _, fold in tasks if fold != "all"}, key=int)
    if not folds:
        return ""
    trainers = list(dict.fromkeys(trainer for trainer, _ in tasks))
    command = ["nnunetv2_mamba", "compare", "-d", shlex.quote(str(args.dataset)), "-c",
               shlex.quote(args.configuration), "-p", shlex.quote(args.plans), "-tr", *trainers, "-f", *folds,
               "-o", shlex.quote(str(Path(args.compare_output or Path(args.output) / "compare").absolute()))]
    if args.baseline:
        command += ["--baseline", args.baseline]
    return " ".join(command)


def _environment_checks(when: str = "submitting") -> List[str]:
    return [f': "${{{name}:?is not set: export {name}=... before {when} (nnU-Net documentation/setting_up_paths.md)}}"'
            for name in _NNUNET_FOLDERS]


def _sbatch(directives: Sequence[Tuple[str, object]]) -> List[str]:
    return [f"#SBATCH --{key}={value}" for key, value in directives if value not in (None, "")]


def slurm_scripts(args: argparse.Namespace) -> dict:
    """Return {file name: text} of train_array.sbatch, compare.sbatch (if there are CV folds) and submit.sh."""
    tasks = validate_tasks(args.dataset, args.trainers, args.folds)
    _check_settings(args)
    logs = Path(args.output).absolute() / "logs"
    name = f"nnunet_{args.dataset}_{args.configuration}"
    array = f"0-{len(tasks) - 1}" + (f"%{args.array_limit}" if args.array_limit else "")
    header = ["#!/bin/bash"]
    common = [("partition", args.partition), ("account", args.account)]
    train = header + _sbatch([("job-name", f"{name}_train"), ("array", array), *common,
                              ("nodes", 1), ("ntasks", 1), ("gres", f"gpu:{args.gpus}"),
                              ("cpus-per-task", args.cpus), ("mem", args.mem), ("time", args.time),
                              ("output", logs / "train_%A_%a.out")])
    train += [f"# Written by `nnunetv2_mamba cluster slurm`: {len(tasks)} tasks (trainer x fold), submit with "
              "submit.sh.", "set -euo pipefail", *_environment_checks(),
              "TRAINERS=(" + " ".join(t for t, _ in tasks) + ")",
              "FOLDS=(" + " ".join(f for _, f in tasks) + ")",
              'TASK="${SLURM_ARRAY_TASK_ID:?is not set: this is a SLURM array job, submit it with submit.sh}"',
              'if (( TASK < 0 || TASK >= ${#TRAINERS[@]} )); then',
              '    echo "array task $TASK is out of range 0-$(( ${#TRAINERS[@]} - 1 ))" >&2; exit 1',
              "fi",
              'TRAINER="${TRAINERS[$TASK]}"', 'FOLD="${FOLDS[$TASK]}"',
              'echo "task $TASK: $TRAINER fold $FOLD on $(hostname)"', *args.setup,
              train_command(args, '"$FOLD"', '"$TRAINER"'), ""]
    scripts = {"train_array.sbatch": "\n".join(train)}
    compare = compare_command(args, tasks)
    submit = ["#!/bin/bash", "# Submit the training array, then the compare job once every task succeeded.",
              "set -euo pipefail", 'cd "$(dirname "$0")"', f"mkdir -p {shlex.quote(str(logs))}",
              "array_job=$(sbatch --parsable train_array.sbatch)",
              'array_job="${array_job%%;*}"  # --parsable prints "id;cluster" on multi-cluster sites',
              'echo "training array: job $array_job"']
    if compare:
        scripts["compare.sbatch"] = "\n".join(
            header + _sbatch([("job-name", f"{name}_compare"), ("partition", args.compare_partition or args.partition),
                              ("account", args.account), ("ntasks", 1), ("cpus-per-task", 2),
                              ("mem", args.compare_mem), ("time", args.compare_time),
                              ("output", logs / "compare_%j.out")])
            + ["# Written by `nnunetv2_mamba cluster slurm`: runs after the training array (afterok).",
               "set -euo pipefail", *_environment_checks(), *args.setup, compare, ""])
        submit += ["compare_job=$(sbatch --parsable --dependency=afterok:$array_job compare.sbatch)",
                   'echo "compare: job ${compare_job%%;*} (starts when every training task succeeded)"']
    scripts["submit.sh"] = "\n".join(submit + [""])
    return scripts


def local_script(args: argparse.Namespace) -> dict:
    """Return {"train_local.sh": text}: the tasks dealt round-robin to the GPUs, one queue per GPU, then compare."""
    tasks = validate_tasks(args.dataset, args.trainers, args.folds)
    _check_settings(args)
    devices = args.devices
    if not devices or any(not re.match(r"^\d+$", d) for d in devices) or len(set(devices)) != len(devices):
        raise ClusterError(f"--devices {' '.join(devices or [])!r}: give distinct GPU indices, e.g. --devices 0 1 2 3")
    logs = Path(args.output).absolute() / "logs"
    lines = ["#!/bin/bash",
             f"# Written by `nnunetv2_mamba cluster local`: {len(tasks)} tasks (trainer x fold) on GPUs "
             f"{' '.join(devices)}, one task per GPU at a time.", "set -uo pipefail", *_environment_checks("running"),
             *args.setup, f"LOGS={shlex.quote(str(logs))}", 'mkdir -p "$LOGS"', "pids=()"]
    for index, device in enumerate(devices):
        queue = tasks[index::len(devices)]
        if not queue:
            continue
        lines += [f"(  # GPU {device}", "    failed=0"]
        for trainer, fold in queue:
            log = f'"$LOGS/{trainer}_fold_{fold}.log"'
            lines += [f'    echo "GPU {device}: {trainer} fold {fold} (log {logs}/{trainer}_fold_{fold}.log)"',
                      f"    CUDA_VISIBLE_DEVICES={device} {train_command(args, fold, trainer)} > {log} 2>&1 "
                      f'|| {{ echo "FAILED: {trainer} fold {fold}" >&2; failed=1; }}']
        lines += ['    exit "$failed"', ") &", "pids+=($!)"]
    lines += ["status=0", 'for pid in "${pids[@]}"; do wait "$pid" || status=1; done',
              'if (( status != 0 )); then echo "some trainings failed: see $LOGS" >&2; exit 1; fi']
    compare = compare_command(args, tasks)
    if compare:
        lines.append(compare)
    return {"train_local.sh": "\n".join(lines + [""])}


def write_scripts(scripts: dict, output: str) -> List[Path]:
    """Write the scripts (executable) into ``output`` through temporary files; return their paths."""
    folder = Path(output)
    (folder / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    written = []
    for name, text in scripts.items():
        atomic_write(folder / name, text, mode=0o777)  # executable for whoever the umask lets read it
        written.append(folder / name)
    return written


def command_slurm(args: argparse.Namespace) -> int:
    written = write_scripts(slurm_scripts(args), args.output)
    print("Wrote " + ", ".join(str(p) for p in written))
    print(f"Submit with: bash {Path(args.output) / 'submit.sh'}")
    return 0


def command_local(args: argparse.Namespace) -> int:
    written = write_scripts(local_script(args), args.output)
    print(f"Wrote {written[0]}\nRun with: bash {written[0]}")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer class names")
    parser.add_argument("-f", "--folds", nargs="+", default=list(CV_FOLDS), help="folds 0-4 or 'all' (default 0-4)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", "--output", required=True, help="folder for the scripts and logs/")
    parser.add_argument("--npz", action="store_true", help="pass --npz (keep softmax outputs for ensembling)")
    parser.add_argument("--continue-training", action="store_true",
                        help="pass --c (continue from the latest checkpoint, so that reruns resume)")
    parser.add_argument("--baseline", help="baseline of the compare step (default: the first trainer)")
    parser.add_argument("--compare-output", help="compare's output folder (default OUTPUT/compare)")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before each job, e.g. 'source ~/venv/bin/activate' (repeatable)")


def add_cluster_subcommand(subparsers) -> None:
    """Register ``cluster slurm`` and ``cluster local`` on the CLI's subparsers."""
    cluster = subparsers.add_parser("cluster", help="write job scripts: trainers x folds on SLURM or one "
                                                    "multi-GPU workstation, then compare")
    commands = cluster.add_subparsers(dest="cluster_command", required=True)
    slurm = commands.add_parser("slurm", help="SLURM job array (one task per trainer x fold) + compare job")
    _add_common(slurm)
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per task (>1: nnU-Net's -num_gpus, DDP)")
    slurm.add_argument("--cpus", type=int, default=8, help="CPUs per task (data augmentation workers)")
    slurm.add_argument("--mem", default="64G", help="memory per task (SLURM size, default 64G)")
    slurm.add_argument("--time", default="48:00:00", help="time limit per task (default 48:00:00)")
    slurm.add_argument("--partition", help="SLURM partition of the training tasks")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument("--array-limit", type=int, help="run at most this many tasks at once (array %%N)")
    slurm.add_argument("--compare-partition", help="partition of the compare job (default: --partition)")
    slurm.add_argument("--compare-mem", default="8G", help="memory of the compare job (default 8G)")
    slurm.add_argument("--compare-time", default="01:00:00", help="time limit of the compare job")
    slurm.set_defaults(func=command_slurm)
    local = commands.add_parser("local", help="one script for a multi-GPU workstation (one task per GPU)")
    _add_common(local)
    local.add_argument("--devices", nargs="+", default=["0"], help="GPU indices to use (default 0)")
    local.set_defaults(func=command_local)
