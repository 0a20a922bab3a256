"""The quick-start job on real anatomy: MNI152 brain tissues -> plan/preprocess -> train -> predict -> evaluate.

Every step is nnU-Net's own code (the functions behind ``nnUNetv2_plan_and_preprocess``, the trainer's
``run_training``, ``nnUNetPredictor``, nnU-Net's evaluation), run in-process inside one work folder, so the demo needs
no environment variables and leaves nothing elsewhere. nnU-Net's own output (plans, per-epoch lines) goes to log
files in ``WORKDIR/logs``; the terminal gets one progress bar per long step. ``DemoResult.report()`` is the text
the command prints at the end: the per-class Dice table, every output folder, and the nnU-Net commands to go on.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

logger = logging.getLogger(__name__)

DEFAULT_TRAINER = "nnUNetTrainerUMambaBot"
BASELINE_TRAINER = "nnUNetTrainer"
DATASET_ID = 152
CONFIGURATIONS = ("3d_fullres", "2d")  # what nnU-Net plans for the demo's small cases (no 3d_lowres)
#: Default schedules and data per device: CPU about 15 minutes on 2 cores, GPU a longer, better-trained run.
DEFAULTS = {
    "cpu": {"epochs": 8, "iterations": 16, "n_train": 20, "n_test": 4, "size": 48},
    "cuda": {"epochs": 50, "iterations": 100, "n_train": 40, "n_test": 8, "size": 64},
}


class DemoError(ValueError):
    """A demo argument or folder is unusable (the message says how to fix it)."""


@dataclass
class TrainedModel:
    """One trained trainer: its folders and nnU-Net's evaluation summary on the held-out cases."""

    trainer_name: str
    results_dir: Path
    predictions_dir: Path
    summary: dict = field(default_factory=dict)

    def dice(self, label: int) -> float:
        """Return the mean Dice of ``label`` over the held-out cases."""
        return float(self.summary["mean"][str(label)]["Dice"])


@dataclass
class DemoResult:
    """What the demo produced: folders, timings (seconds per step), evaluations and the figure."""

    workdir: Path
    dataset_dir: Path
    configuration: str
    device: str
    epochs: int
    iterations: int
    labels: Dict[str, int]
    models: List[TrainedModel] = field(default_factory=list)
    chance_dice: Dict[int, float] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    figure: Optional[Path] = None
    logs_dir: Optional[Path] = None
    prepared_only: bool = False

    @property
    def dataset_id(self) -> int:
        return int(self.dataset_dir.name[len("Dataset"):].split("_")[0])

    def dice_table(self) -> str:
        """Return the per-class Dice table (held-out cases), one column per model and chance's column."""
        names = [model.trainer_name for model in self.models]
        width = max([len("label")] + [len(name) for name in self.labels])
        columns = [max(len(name), 6) for name in names] + [len("chance")]
        lines = ["  ".join([f"{'label':<{width}}"] + [f"{name:>{w}}" for name, w in zip(names + ["chance"],
                                                                                      columns)])]
        foreground = [(name, value) for name, value in self.labels.items() if value > 0]
        for name, value in foreground:
            cells = [model.dice(value) for model in self.models] + [self.chance_dice[value]]
            lines.append("  ".join([f"{name:<{width}}"] + [f"{cell:>{w}.3f}" for cell, w in zip(cells, columns)]))
        means = [sum(model.dice(v) for _, v in foreground) / len(foreground) for model in self.models]
        means.append(sum(self.chance_dice[v] for _, v in foreground) / len(foreground))
        lines.append("  ".join([f"{'mean':<{width}}"] + [f"{cell:>{w}.3f}" for cell, w in zip(means, columns)]))
        return "\n".join(lines)

    def next_commands(self) -> str:
        """Return the ``export`` lines and the nnU-Net commands that go on from this demo."""
        device = "" if self.device == "cuda" else f" -device {self.device}"
        trainer = self.models[0].trainer_name if self.models else DEFAULT_TRAINER
        more_epochs = f"{trainer}_{50 if self.device == 'cpu' else 250}epochs"
        predictions = self.workdir / "predictions" / more_epochs
        folders = {v: self.workdir / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        return "\n".join(
            [f"export {variable}={path}" for variable, path in folders.items()] +
            ([f"nnUNetv2_plan_and_preprocess -d {self.dataset_id} -c {self.configuration} -np 1"]
             if self.prepared_only else []) +
            [f"nnUNetv2_train {self.dataset_id} {self.configuration} 0 -tr {more_epochs}{device}",
             f"nnUNetv2_predict -i {self.dataset_dir / 'imagesTs'} -o {predictions} -d {self.dataset_id} "
             f"-c {self.configuration} -f 0 -tr {more_epochs}{device}",
             f"nnUNetv2_evaluate_folder {self.dataset_dir / 'labelsTs'} {predictions} "
             f"-djfile {self.dataset_dir / 'dataset.json'} -pfile "
             f"{self.workdir / 'nnUNet_preprocessed' / self.dataset_dir.name / 'nnUNetPlans.json'}"])

    def report(self) -> str:
        """Return the text printed at the end of ``nnunetv2_mamba demo``."""
        if self.prepared_only:
            lines = [f"Dataset written to {self.dataset_dir} (--prepare-only: nothing planned or trained)", "",
                     "Time per step:"]
        else:
            lines = [f"Demo finished in {self.workdir}", "", "Time per step:"]
        width = max([len(step) for step in self.timings] + [20])
        lines += [f"  {step:<{width}} {seconds:8.1f} s" for step, seconds in self.timings.items()]
        if self.models:
            lines += ["", f"Dice on the {len(list((self.dataset_dir / 'labelsTs').glob('*.nii.gz')))} held-out "
                      f"cases ({self.configuration}, {self.epochs} epochs x {self.iterations} iterations; chance: a "
                      "random guess with the true class frequencies):", self.dice_table()]
        lines += ["", "Folders:", f"  dataset (nnU-Net raw):  {self.dataset_dir}",
                  f"  preprocessed:           {self.workdir / 'nnUNet_preprocessed' / self.dataset_dir.name}"]
        for model in self.models:
            lines += [f"  model {model.trainer_name}: {model.results_dir}",
                      f"  predictions {model.trainer_name}: {model.predictions_dir}"]
        if self.figure is not None:
            lines.append(f"  figure:                 {self.figure}")
        if self.logs_dir is not None:
            lines.append(f"  nnU-Net's logs:         {self.logs_dir}")
        lines += ["", "Go on with nnU-Net's own commands (a longer schedule of the same trainer):" if self.models else
                  "Go on with nnU-Net's own commands:", self.next_commands()]
        return "\n".join(lines)


# --- checks done before anything is planned --------------------------------------------------------------------
def check_workdir(workdir: os.PathLike) -> Path:
    """Return the resolved work folder, created if needed; raise DemoError if it is a file or not writable."""
    path = Path(workdir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DemoError(f"--workdir {path} is a file, not a folder; give a folder path (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise DemoError(f"--workdir {path} is not writable ({error.strerror}); choose a folder you can write to.")
    return path


def known_trainer_names() -> List[str]:
    """Return the trainer names the demo can suggest: the plugin's (with short schedules) and nnU-Net's default."""
    from nnunetv2_mamba.trainers.discovery import load_trainer_classes
    from nnunetv2_mamba.trainers.schedules import SHORT_EPOCHS, short_schedule_name

    return sorted(load_trainer_classes()) + [BASELINE_TRAINER] + [short_schedule_name(BASELINE_TRAINER, n)
                                                                 for n in SHORT_EPOCHS]


def resolve_trainer(name: str) -> type:
    """Return the trainer class nnU-Net's lookup finds for ``name``; suggest the closest names if there is none."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup prints every folder it searches
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        close = difflib.get_close_matches(name, known_trainer_names(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DemoError(f"--trainer {name!r}: nnU-Net finds no such trainer.{hint} `nnunetv2_mamba list` shows "
                        "every trainer.") from None


def check_configuration(configuration: str, trainer_class: type) -> int:
    """Return the configuration's dimensionality; raise DemoError for one the demo cannot train."""
    if configuration not in CONFIGURATIONS:
        raise DemoError(f"--configuration {configuration!r} does not exist for the demo's data; choose one of "
                        f"{', '.join(CONFIGURATIONS)}.")
    dim = 2 if configuration == "2d" else 3
    supported = getattr(trainer_class, "supported_dims", (2, 3))
    if dim not in supported:
        raise DemoError(f"{trainer_class.__name__} trains {' and '.join(f'{d}D' for d in supported)} networks; "
                        f"--configuration {configuration} is {dim}D. Use --configuration "
                        f"{'3d_fullres' if 3 in supported else '2d'}.")
    return dim


def resolve_device(device: str) -> str:
    """Return "cpu" or "cuda" for ``auto``/``cpu``/``cuda``; raise DemoError for cuda without a CUDA device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda was requested but no CUDA device is visible; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise DemoError(f"--device must be auto, cpu or cuda; got {device!r}.")
    return device


def _configure_nnunet_environment(workdir: Path) -> None:
    """Point nnU-Net at folders inside workdir and size its worker pools for this machine."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[variable] = str(workdir / variable)
        (workdir / variable).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(4, cpus // 2))))
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, min(8, cpus - 1))))


# --- output handling ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_to_log(log_path: Path):
    """Send stdout and stderr (also of child processes) to ``log_path``; yield a stream to the real terminal.

    nnU-Net prints its plans, per-epoch lines and its own progress bars; they belong in a log, the demo's progress
    bars on the terminal (the yielded stream writes to the original stderr).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    try:
        for fd in (1, 2):
            saved.append(os.dup(fd))
    except OSError:  # no real file descriptors (embedded interpreters): only redirect Python's streams
        saved = []
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1) if saved else sys.stderr
    with open(log_path, "a", buffering=1) as log:  # line-buffered: the log can be followed while a step runs
        if saved:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield terminal
        except BaseException:
            log.flush()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            log.flush()
            if saved:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                terminal.close()


def _progress(total: int, description: str, stream, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=stream, disable=not enabled, dynamic_ncols=True, leave=True)


@contextlib.contextmanager
def _step(name: str, timings: Dict[str, float], log_path: Path):
    started = time.perf_counter()
    try:
        yield
    except (DemoError, KeyboardInterrupt):
        raise
    except Exception as error:
        raise RuntimeError(f"demo step '{name}' failed: {type(error).__name__}: {error} (nnU-Net's output: "
                           f"{log_path})") from error
    finally:
        timings[name] = time.perf_counter() - started


# --- the steps ---------------------------------------------------------------------------------------------------
def prepare_dataset(raw_root: Path, n_train: int, n_test: int, size: int, seed: int, stream=None,
                    progress: bool = True) -> Path:
    """Return the MNI152 dataset folder in ``raw_root``, building it unless the same one is already there."""
    from nnunetv2_mamba.data import mni152

    folder = raw_root / mni152.dataset_folder_name(DATASET_ID)
    wanted = {"seed": int(seed), "size": int(size), "n_test": int(n_test)}
    if folder.is_dir():
        description = json.loads((folder / "dataset.json").read_text())
        found = dict(description.get("nnunetv2_mamba", {}), n_train=description.get("numTraining"))
        if found != dict(wanted, n_train=int(n_train)):
            raise DemoError(f"{folder} holds another demo dataset ({found}); this run asks for "
                            f"{dict(wanted, n_train=int(n_train))}. Use another --workdir or delete that folder.")
        return folder
    with _progress(n_train + n_test, "dataset (MNI152 cases)", stream or sys.stderr, progress) as bar:
        return mni152.make_mni152_dataset(raw_root, DATASET_ID, n_train=n_train, n_test=n_test, size=size,
                                          seed=seed, progress=lambda: bar.update(1))


def plan_and_preprocess(dataset_dir: Path, preprocessed_root: Path, configuration: str, stream, progress: bool):
    """Run nnU-Net's fingerprint extraction, planning and preprocessing (skipping what is already done)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    dataset_id = int(dataset_dir.name[len("Dataset"):].split("_")[0])
    preprocessed = preprocessed_root / dataset_dir.name
    with _progress(3, "plan and preprocess", stream, progress) as bar:
        if not (preprocessed / "dataset_fingerprint.json").exists():
            extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
        bar.update(1)
        if not (preprocessed / "nnUNetPlans.json").exists():
            plan_experiments([dataset_id])
        bar.update(1)
        plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
        if configuration not in plans["configurations"]:
            raise DemoError(f"nnU-Net planned no {configuration!r} configuration for this dataset; available: "
                            f"{', '.join(sorted(plans['configurations']))}.")
        identifier = plans["configurations"][configuration].get("data_identifier", f"nnUNetPlans_{configuration}")
        if not (preprocessed / identifier).is_dir():
            preprocess([dataset_id], configurations=(configuration,), num_processes=(1,))
        bar.update(1)
    return plans


def train(trainer_class: type, plans: dict, dataset_json: dict, configuration: str, device: str, epochs: int,
          iterations: int, stream, progress: bool) -> Path:
    """Train fold 0 with nnU-Net's ``run_training`` for epochs x iterations; return the results folder."""
    import torch

    plans = json.loads(json.dumps(plans))
    plans["continue_training"] = False  # nnU-Net 2.8's run_training sets this key; the trainer pops it
    trainer = trainer_class(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json,
                            device=torch.device(device))
    trainer.num_epochs = epochs  # the trainer's schedule reads num_epochs when its optimizer is made
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(1, iterations // 5)
    bar = _progress(epochs * iterations, f"train {trainer_class.__name__}", stream, progress)
    train_step, on_epoch_end = trainer.train_step, trainer.on_epoch_end

    def counted_train_step(batch):
        output = train_step(batch)
        bar.update(1)
        return output

    def reported_epoch_end():
        on_epoch_end()
        value = trainer.logger.get_value
        bar.set_postfix(epoch=trainer.current_epoch, loss=f"{float(value('train_losses', step=-1)):.3f}",
                        pseudo_dice=f"{float(value('ema_fg_dice', step=-1)):.3f}")

    trainer.train_step, trainer.on_epoch_end = counted_train_step, reported_epoch_end
    try:
        with bar:
            trainer.run_training()
    except BaseException:
        _stop_data_loaders(trainer)  # nnU-Net stops its augmentation workers only after a finished run
        raise
    return Path(trainer.output_folder).parent


def _stop_data_loaders(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val"):
        loader = getattr(trainer, name, None)
        if loader is not None and hasattr(loader, "_finish"):
            with contextlib.suppress(Exception):
                loader._finish()


def predict(results_dir: Path, images_dir: Path, output_dir: Path, device: str, stream, progress: bool,
            name: str) -> None:
    """Predict every held-out image with nnU-Net's predictor (fold 0, final checkpoint)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_mamba.reliability import require_checkpoint

    # Before nnU-Net's predictor, whose missing-file error does not say which checkpoints exist or what to pass.
    require_checkpoint(str(results_dir), (0,), "checkpoint_final.pth")
    # Mirroring (8 flipped copies of every patch in 3D) is nnU-Net's default; on a CPU it would make this step 8x
    # slower for a small gain, so the CPU demo predicts without it.
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=device == "cuda",
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results_dir), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    images = sorted(images_dir.glob("*_0000.nii.gz"))
    output_dir.mkdir(parents=True, exist_ok=True)
    with _progress(len(images), f"predict {name}", stream, progress) as bar:
        for image in images:
            case = image.name[:-len("_0000.nii.gz")]
            predictor.predict_from_files_sequential([[str(image)]], [str(output_dir / case)],
                                                    save_probabilities=False, overwrite=True)
            bar.update(1)


def chance_dice(labels_dir: Path, labels: Dict[str, int]) -> Dict[int, float]:
    """Return, per label, the expected Dice of a random guess drawn with the true class frequencies.

    For a prediction that picks label k independently with probability p_k (its frequency in the ground truth),
    the expected overlap is p_k^2 N, so Dice = 2 p_k^2 N / (p_k N + p_k N) = p_k; averaged over the cases.
    """
    import numpy as np
    import SimpleITK as sitk

    fractions = {value: [] for value in labels.values() if value > 0}
    for path in sorted(labels_dir.glob("*.nii.gz")):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        for value in fractions:
            fractions[value].append(float(np.mean(array == value)))
    return {value: float(np.mean(values)) for value, values in fractions.items()}


def write_figure(dataset_dir: Path, models: List[TrainedModel], labels: Dict[str, int], path: Path) -> Path:
    """Write a PNG: the first held-out case's image, ground truth and predictions at three slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image_path = sorted((dataset_dir / "imagesTs").glob("*_0000.nii.gz"))[0]
    case = image_path.name[:-len("_0000.nii.gz")]

    def read(p):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))

    image = read(image_path)
    spacing = tuple(reversed(sitk.ReadImage(str(image_path)).GetSpacing()))  # array axes
    aspect = spacing[-2] / spacing[-1]  # rows / columns of a displayed slice, so that anatomy is not stretched
    panels = [("ground truth", read(dataset_dir / "labelsTs" / f"{case}.nii.gz"))]
    panels += [(model.trainer_name, read(model.predictions_dir / f"{case}.nii.gz")) for model in models]
    colours = ["#000000", "#3c8dd6", "#bdbdbd", "#f2f2f2", "#ff7f0e", "#2ca02c"][:max(labels.values()) + 1]
    colormap = ListedColormap(colours)
    slices = [int(round(f * (image.shape[0] - 1))) for f in (0.35, 0.5, 0.65)] if image.ndim == 3 else [0]
    figure, axes = plt.subplots(len(slices), 1 + len(panels), figsize=(2.6 * (1 + len(panels)), 2.6 * len(slices)),
                                squeeze=False)
    for row, index in enumerate(slices):
        view = (lambda a: a[index]) if image.ndim == 3 else (lambda a: a)
        axes[row][0].imshow(view(image), cmap="gray", aspect=aspect)
        axes[row][0].set_ylabel(f"slice {index}", fontsize=8)
        for column, (title, volume) in enumerate(panels, start=1):
            axes[row][column].imshow(view(volume), cmap=colormap, vmin=0, vmax=len(colours) - 1,
                                     interpolation="nearest", aspect=aspect)
        for column, title in enumerate(["image (T1)"] + [t for t, _ in panels]):
            if row == 0:
                axes[row][column].set_title(title, fontsize=8)
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
    figure.legend(handles=[Patch(color=colours[v], label=name) for name, v in labels.items()],
                  loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    figure.suptitle(f"{dataset_dir.name}: held-out case {case}", fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=100)
    plt.close(figure)
    staging.replace(path)
    return path


def run_demo(workdir: os.PathLike, trainer_name: str = DEFAULT_TRAINER, configuration: str = "3d_fullres",
             epochs: Optional[int] = None, iterations: Optional[int] = None, device: str = "auto",
             baseline: bool = False, prepare_only: bool = False, n_train: Optional[int] = None,
             n_test: Optional[int] = None, size: Optional[int] = None, seed: int = 0,
             progress: bool = True) -> DemoResult:
    """Run the demo in ``workdir`` and return its result; data and plans already prepared there are reused.

    Unset ``epochs``, ``iterations``, ``n_train``, ``n_test``, ``size`` take the device's ``DEFAULTS``.
    Every argument is checked before anything is planned.
    """
    for argument, value in (("epochs", epochs), ("iterations", iterations), ("n_test", n_test)):
        if value is not None and value < 1:
            raise DemoError(f"--{argument} must be >= 1; got {value}.")
    workdir = check_workdir(workdir)
    torch_device = resolve_device(device)
    defaults = DEFAULTS[torch_device]
    epochs = defaults["epochs"] if epochs is None else int(epochs)
    iterations = defaults["iterations"] if iterations is None else int(iterations)
    n_train = defaults["n_train"] if n_train is None else int(n_train)
    n_test = defaults["n_test"] if n_test is None else int(n_test)
    size = defaults["size"] if size is None else int(size)
    _configure_nnunet_environment(workdir)
    # Printed at import by a dependency of nnU-Net; says nothing about the user's run.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated")
    from nnunetv2_mamba.data.mni152 import LABELS

    trainers = []
    if not prepare_only:
        trainers = [resolve_trainer(trainer_name)] + ([resolve_trainer(BASELINE_TRAINER)] if baseline else [])
        for trainer_class in trainers:
            check_configuration(configuration, trainer_class)
    logs = workdir / "logs"
    result = DemoResult(workdir=workdir, dataset_dir=workdir, configuration=configuration, device=torch_device,
                        epochs=epochs, iterations=iterations, labels=dict(LABELS), logs_dir=logs)
    terminal = sys.stderr
    with _step("dataset", result.timings, logs / "dataset.log"):
        result.dataset_dir = prepare_dataset(workdir / "nnUNet_raw", n_train, n_test, size, seed, terminal, progress)
    if prepare_only:
        result.prepared_only = True
        return result

    log = logs / "plan_and_preprocess.log"
    with _step("plan_and_preprocess", result.timings, log), output_to_log(log) as terminal:
        plans = plan_and_preprocess(result.dataset_dir, workdir / "nnUNet_preprocessed", configuration, terminal,
                                    progress)
    dataset_json = json.loads((workdir / "nnUNet_preprocessed" / result.dataset_dir.name / "dataset.json").read_text())
    for trainer_class in trainers:
        name = trainer_class.__name__
        log = logs / f"train_{name}.log"
        with _step(f"train {name}", result.timings, log), output_to_log(log) as terminal:
            results_dir = train(trainer_class, plans, dataset_json, configuration, torch_device, epochs, iterations,
                                terminal, progress)
        model = TrainedModel(name, results_dir, workdir / "predictions" / name)
        log = logs / f"predict_{name}.log"
        with _step(f"predict {name}", result.timings, log), output_to_log(log) as terminal:
            predict(results_dir, result.dataset_dir / "imagesTs", model.predictions_dir, torch_device, terminal,
                    progress, name)
        with _step(f"evaluate {name}", result.timings, log), output_to_log(log):
            from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

            compute_metrics_on_folder_simple(str(result.dataset_dir / "labelsTs"), str(model.predictions_dir),
                                             sorted(v for v in LABELS.values() if v > 0), num_processes=1)
        model.summary = json.loads((model.predictions_dir / "summary.json").read_text())
        result.models.append(model)
    result.chance_dice = chance_dice(result.dataset_dir / "labelsTs", LABELS)
    with _step("figure", result.timings, logs / "figure.log"):
        result.figure = write_figure(result.dataset_dir, result.models, LABELS,
                                     workdir / f"demo_{result.models[0].trainer_name}.png")
    return result
