"""``nnunetv2_mamba`` command line: doctor, list, demo (and the subcommands other modules register)."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

PACKAGES = ("nnunetv2", "torch", "mamba-ssm", "causal-conv1d", "triton", "dynamic-network-architectures")
NNUNET_RANGE = ((2, 8), (2, 9))  # >= 2.8, < 2.9


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse_major_minor(version: str) -> Tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


class Report:
    """Collects doctor lines; problems (needed things missing) decide the exit code."""

    def __init__(self):
        self.lines: List[str] = []
        self.problems = 0
        self.warnings = 0

    def section(self, title: str) -> None:
        self.lines.append(f"\n{title}")

    def ok(self, text: str) -> None:
        self.lines.append(f"  [ok]   {text}")

    def note(self, text: str) -> None:
        self.lines.append(f"  [info] {text}")

    def warn(self, text: str, fix: str) -> None:
        """Something to fix before some use (e.g. nnU-Net's own commands), that does not break training."""
        self.warnings += 1
        self.lines.append(f"  [warn] {text}\n         fix: {fix}")

    def problem(self, text: str, fix: str) -> None:
        self.problems += 1
        self.lines.append(f"  [FAIL] {text}\n         fix: {fix}")


def _check_versions(report: Report) -> None:
    report.section("Packages")
    report.ok(f"python {sys.version.split()[0]}")
    for distribution in PACKAGES:
        version = _version(distribution)
        if distribution == "nnunetv2":
            if version is None:
                report.problem("nnunetv2 is not installed", "pip install 'nnunetv2>=2.8,<2.9'")
            elif not NNUNET_RANGE[0] <= _parse_major_minor(version) < NNUNET_RANGE[1]:
                report.problem(f"nnunetv2 {version} is installed; this plugin needs >=2.8,<2.9",
                               "pip install 'nnunetv2>=2.8,<2.9'")
            else:
                report.ok(f"nnunetv2 {version}")
        elif version is None and distribution in ("torch", "dynamic-network-architectures"):
            report.problem(f"{distribution} is not installed", f"pip install {distribution}")
        elif version is None:
            report.note(f"{distribution}: not installed (optional; `pip install nnunetv2-mamba[cuda]` on a CUDA "
                        "machine with nvcc gives the fast kernels)")
        else:
            report.ok(f"{distribution} {version}")


def _check_devices_and_backends(report: Report) -> None:
    import torch

    from nnunetv2_mamba.ssm import BACKEND_ENV_VAR, BackendError, describe_backends, select_backend_for
    from nnunetv2_mamba.ssm.backends.triton_backend import preferred_min_length

    report.section("Devices")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            report.ok(f"cuda:{index} {torch.cuda.get_device_name(index)}")
    else:
        report.note(f"no CUDA device visible (torch {torch.__version__}); training and inference run on the CPU, "
                    "slowly: add `-device cpu` to nnUNetv2_train and nnUNetv2_predict")
    report.section("Selective-scan backends (automatic order)")
    for row in describe_backends():
        if row["available"]:
            report.ok(f"{row['name']}: available - {row['description']}")
        else:
            report.note(f"{row['name']}: unavailable - {row['reason']}")
    forced = os.environ.get(BACKEND_ENV_VAR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = f" (forced by ${BACKEND_ENV_VAR}={forced})" if forced else ""
    chosen_names = []
    try:
        chosen_names.append(select_backend_for(1, 16, device).name)
        report.ok(f"chosen for fp32 tensors on {device}: {chosen_names[-1]}{source}")
    except BackendError as error:
        report.problem(str(error), f"unset {BACKEND_ENV_VAR} or install the requested backend")
    try:  # the SegMamba family scans with d_state 128, beyond the triton kernels' limit: say what it gets
        chosen_names.append(select_backend_for(1, 128, device).name)
        report.ok(f"chosen for d_state 128 (the SegMamba family) on {device}: {chosen_names[-1]}{source}")
    except BackendError as error:
        report.note(f"the SegMamba family (d_state 128) cannot run here: {error}")
    try:  # the automatic choice also looks at the length: a 3D stage at 128^3 scans 2^21 tokens
        long_length = max(preferred_min_length(), 1)
        report.ok(f"chosen for sequences of {long_length} tokens or more on {device}: "
                  f"{select_backend_for(long_length, 16, device).name}{source}")
        # SegMamba's d_state follows its channels (32 at 128^3, 64 at 64^3): triton claims long scans up to 32 states
        report.ok(f"chosen for such sequences with d_state 64 on {device}: "
                  f"{select_backend_for(long_length, 64, device).name}{source}")
    except (BackendError, ValueError) as error:
        report.problem(str(error), f"unset {BACKEND_ENV_VAR} and NNUNETV2_MAMBA_TRITON_MIN_LENGTH")
    if device == "cuda" and not forced and "torch" in chosen_names:
        report.note("only the pure-PyTorch scan is usable on this GPU for some networks (see the lines above): "
                    "install mamba-ssm for full speed")
    _check_mixer_precision(report, device)


def _check_mixer_precision(report: Report, device: str) -> None:
    """Report the dtype the Mamba mixers train in under nnU-Net's AMP here (ARCHITECTURES.md §0.6)."""
    import torch

    from nnunetv2_mamba.layers.precision import MIXER_DTYPE_ENV_VAR, mixer_dtype

    report.section("Mamba mixer precision")
    try:
        dtype = mixer_dtype(device, autocast_enabled=device == "cuda")
    except ValueError as error:
        report.problem(str(error), f"unset {MIXER_DTYPE_ENV_VAR} or set it to auto, fp32 or bf16")
        return
    if device != "cuda":
        report.ok("fp32 (nnU-Net trains without autocast on the CPU)")
    elif dtype is torch.bfloat16:
        report.ok(f"bf16 autocast under nnU-Net's fp16 AMP (LayerNorm and scan state in fp32; "
                  f"{MIXER_DTYPE_ENV_VAR}=fp32 for the published fp32 mixers)")
    else:
        report.ok("fp32 with autocast off (this GPU has no bf16, or "
                  f"{MIXER_DTYPE_ENV_VAR}=fp32)")
    _check_memory_format(report, device)


def _check_memory_format(report: Report, device: str) -> None:
    """Report the memory format the networks' feature maps run in here (docs/DECISIONS.md, channels last)."""
    from nnunetv2_mamba.layers.memory_format import CHANNELS_LAST_ENV_VAR, requested_channels_last

    report.section("Feature-map memory format")
    try:
        choice = requested_channels_last()
    except ValueError as error:
        report.problem(str(error), f"unset {CHANNELS_LAST_ENV_VAR} or set it to auto, 0 or 1")
        return
    if choice == "0":
        report.ok(f"contiguous (NCDHW) everywhere ({CHANNELS_LAST_ENV_VAR}=0)")
    elif choice == "1":
        report.ok(f"channels last for 2D and 3D maps on a GPU, 3D maps on the CPU ({CHANNELS_LAST_ENV_VAR}=1)")
    elif device == "cuda":
        report.ok("channels last for 3D maps (cuDNN's own layout), contiguous for 2D")
    else:
        report.ok("contiguous (channels last is used for 3D maps on a GPU)")


_LOOKUP_SNIPPET = (
    "import sys\n"
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
    "import contextlib, io\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    cls = find(sys.argv[1])\n"
    "print(cls.__module__ + '.' + cls.__name__)\n")


def _check_trainers(report: Report) -> None:
    from nnunetv2_mamba.registration import EXT_TRAINER_ENV_VAR
    from nnunetv2_mamba.trainers.discovery import concrete_of, load_trainer_classes

    report.section("Trainer discovery")
    errors: dict = {}
    trainers = [name for name, _ in concrete_of(load_trainer_classes(errors))]
    for module, error in errors.items():
        report.problem(f"trainer module {module} failed to import: {error}",
                       "reinstall nnunetv2-mamba and check the error above")
    if not trainers:
        report.problem("no trainers found", "reinstall nnunetv2-mamba")
        return
    report.ok(f"{len(trainers)} trainers: {', '.join(trainers)}")
    # A fresh interpreter with no nnUNet_extTrainer: what `nnUNetv2_train -tr ...` sees after installation.
    env = {key: value for key, value in os.environ.items() if key != EXT_TRAINER_ENV_VAR}
    completed = subprocess.run([sys.executable, "-c", _LOOKUP_SNIPPET, trainers[0]], env=env,
                               capture_output=True, text=True, timeout=300)
    if completed.returncode == 0:
        report.ok(f"nnU-Net finds {trainers[0]} in a fresh process: {completed.stdout.strip()}")
    else:
        report.problem(f"nnU-Net cannot find {trainers[0]} in a fresh process:\n         "
                       f"{completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else ''}",
                       "reinstall with `pip install nnunetv2-mamba` (the start-up hook nnunetv2_mamba.pth "
                       "must be in site-packages), or export nnUNet_extTrainer=" +
                       os.path.join(os.path.dirname(__file__), "ext_trainers"))


def _check_paths(report: Report) -> None:
    # nnU-Net's commands need these folders; the plugin, its trainers and `nnunetv2_mamba demo` (which sets them
    # for its own folder) do not, so a missing one is a warning, not a failure.
    report.section("nnU-Net folders (needed by nnU-Net's commands, not by `nnunetv2_mamba demo`)")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(variable)
        if not value:
            report.warn(f"{variable} is not set", f"export {variable}=/path/to/{variable} (see nnU-Net's "
                        "documentation/setting_up_paths.md)")
        elif not os.path.isdir(value):
            report.warn(f"{variable}={value} does not exist", f"mkdir -p {value}")
        else:
            report.ok(f"{variable}={value}")


def command_doctor(args: argparse.Namespace) -> int:
    """Print the environment report; return 1 if something needed is missing."""
    report = Report()
    _check_versions(report)
    if _version("torch") is not None:
        _check_devices_and_backends(report)
    if _version("nnunetv2") is not None:
        _check_trainers(report)
    _check_paths(report)
    print("nnunetv2-mamba doctor")
    for line in report.lines:
        print(line)
    warnings = f" {report.warnings} warning(s): see the fixes above." if report.warnings else ""
    if report.problems:
        print(f"\n{report.problems} problem(s) found that stop training; see the fixes above.{warnings}")
        return 1
    print(f"\nEverything needed to train is in place.{warnings}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    """Print one line per trainer: name, network, supported dimensions."""
    from nnunetv2_mamba.trainers.discovery import concrete_trainers
    from nnunetv2_mamba.trainers.schedules import SHORT_EPOCHS, short_schedule_name

    rows = [(name, getattr(cls, "network_family", ""),
             "/".join(f"{d}D" for d in getattr(cls, "supported_dims", ()))) for name, cls in concrete_trainers()]
    if not rows:
        print("No trainers found; run `nnunetv2_mamba doctor`.")
        return 1
    width = max(len(row[0]) for row in rows)
    family_width = max(len(row[1]) for row in rows)
    print(f"{'trainer'.ljust(width)}  {'network'.ljust(family_width)}  dims")
    for name, family, dims in rows:
        print(f"{name.ljust(width)}  {family.ljust(family_width)}  {dims}")
    epochs = ", ".join(short_schedule_name("T", n) for n in SHORT_EPOCHS)
    print(f"\nEach trainer T also comes with short schedules, {epochs} ({len(rows) * len(SHORT_EPOCHS)} "
          "trainers): the same recipe with its learning-rate schedule scaled to the shorter run.")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """Run the quick-start job on the MNI152 brain-tissue data and print its report."""
    from nnunetv2_mamba.demo import run_demo

    result = run_demo(args.workdir, trainer_name=args.trainer, configuration=args.configuration,
                      epochs=args.epochs, iterations=args.iterations, device=args.device, baseline=args.baseline,
                      prepare_only=args.prepare_only, n_train=args.train_cases, n_test=args.test_cases,
                      size=args.size, seed=args.seed, progress=not args.no_progress)
    print("\n" + result.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nnunetv2_mamba", description="Mamba networks for nnU-Net v2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show log messages")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check versions, GPUs, scan backends, trainer discovery and nnU-Net paths"
                   ).set_defaults(func=command_doctor)
    sub.add_parser("list", help="list the trainers with their network and 2D/3D support"
                   ).set_defaults(func=command_list)
    from nnunetv2_mamba.demo import DEFAULT_TRAINER, DEFAULTS

    demo = sub.add_parser(
        "demo", help="build an MNI152 brain-tissue dataset, train a trainer briefly, predict and evaluate it",
        description="Build an nnU-Net dataset of brain tissues (CSF, grey and white matter) from the MNI152 "
                    "template, plan and preprocess it, train a trainer, predict the held-out cases and print "
                    "their per-class Dice. Defaults: CPU {cpu}; GPU {cuda}.".format(
                        **{k: ", ".join(f"{n} {v}" for n, v in d.items()) for k, d in DEFAULTS.items()}))
    demo.add_argument("--workdir", default="nnunetv2_mamba_demo", help="folder for data, models and predictions")
    demo.add_argument("--trainer", default=DEFAULT_TRAINER, help=f"trainer class name (default {DEFAULT_TRAINER})")
    demo.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration: 3d_fullres or 2d")
    demo.add_argument("--epochs", type=int, default=None, help="epochs (default: per device, see above)")
    demo.add_argument("--iterations", type=int, default=None, help="training iterations per epoch")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    demo.add_argument("--baseline", action="store_true",
                      help="also train nnU-Net's default nnUNetTrainer on the same data and schedule")
    demo.add_argument("--prepare-only", action="store_true",
                      help="write the dataset to WORKDIR/nnUNet_raw/Dataset152_MNI152Tissues and stop")
    demo.add_argument("--train-cases", type=int, default=None, help="number of training cases (>= 5)")
    demo.add_argument("--test-cases", type=int, default=None, help="number of held-out test cases")
    demo.add_argument("--size", type=int, default=None, help="nominal voxels per axis of a case (48: ~3.3 mm)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the dataset")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=command_demo)
    from nnunetv2_mamba.cluster import add_cluster_subcommand
    from nnunetv2_mamba.compare.cli import add_compare_subcommand
    from nnunetv2_mamba.planning.plan_cli import add_plan_subcommand
    add_compare_subcommand(sub)
    add_cluster_subcommand(sub)
    add_plan_subcommand(sub)
    _register_optional_subcommands(sub)
    return parser


def _register_optional_subcommands(sub) -> None:
    """Let feature modules add their subcommands (e.g. video tools) without this file knowing them."""
    for module_name in ("nnunetv2_mamba.data.video_cli",):
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        module.add_video_subcommands(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``nnunetv2_mamba`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
