"""``nnunetv2_mamba video convert | plan | export | evaluate``: the video data tools on the command line.

``add_video_subcommands(subparsers)`` is called by ``nnunetv2_mamba.cli``; each handler returns an exit code.
"""
from __future__ import annotations

import argparse
import os


def _default_raw_root() -> str:
    """Return $nnUNet_raw, or '' when it is not set."""
    return os.environ.get("nnUNet_raw", "")


def command_convert(args: argparse.Namespace) -> int:
    """Convert a folder of videos into an nnU-Net raw dataset; print where it went."""
    from nnunetv2_mamba.data.video_convert import video_to_nnunet

    raw_root = args.raw_root or _default_raw_root()
    if not raw_root:
        raise ValueError("No output folder: pass --raw-root or set the nnUNet_raw environment variable.")
    folder = video_to_nnunet(args.input, raw_root, args.dataset_id, name=args.name, test_dir=args.test_input,
                             clip_length=args.clip_length, grayscale=args.grayscale,
                             mask_threshold=args.mask_threshold, time_spacing=args.time_spacing,
                             frames_dir=args.frames_dir, masks_dir=args.masks_dir)
    print(f"Wrote {folder}")
    print(f"Next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres && "
          f"nnunetv2_mamba video plan -d {args.dataset_id} && "
          f"nnUNetv2_train {args.dataset_id} 3d_fullres_vivim 0 -tr nnUNetTrainerVivim")
    return 0


def command_plan(args: argparse.Namespace) -> int:
    """Add the Vivim configurations to a dataset's nnU-Net plans; print what was added."""
    from nnunetv2_mamba.data.video_plan import VIVIM_CONFIGURATIONS, plan_vivim

    plans_file = plan_vivim(args.dataset, plans_identifier=args.plans, preprocessed_root=args.preprocessed,
                            nframes=args.frames, max_inplane=args.max_inplane)
    alternating, v3 = VIVIM_CONFIGURATIONS["alternating"], VIVIM_CONFIGURATIONS["st_v3"]
    print(f"Added the configurations {alternating} and {v3} to {plans_file} (they use 3d_fullres's "
          "preprocessed data).")
    print(f"Next: nnUNetv2_train {args.dataset} {alternating} 0 -tr nnUNetTrainerVivim  "
          f"(or {v3} with -tr nnUNetTrainerVivimV3)")
    return 0


def command_export(args: argparse.Namespace) -> int:
    """Write nnU-Net predictions as per-frame mask images; print where they went."""
    from nnunetv2_mamba.data.video_export import predictions_to_frames

    folder = predictions_to_frames(args.predictions, args.dataset, args.output,
                                   foreground_value=args.foreground_value, image_format=args.format,
                                   overwrite=args.overwrite)
    print(f"Wrote per-frame masks to {folder}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    """Evaluate per-frame masks against reference masks; print the table and save CSV/JSON."""
    from nnunetv2_mamba.evaluation.video_metrics import evaluate_video_predictions, format_table

    evaluation = evaluate_video_predictions(args.predictions, args.reference, output_dir=args.output,
                                            fps=args.fps, inference_seconds=args.inference_seconds,
                                            mask_threshold=args.mask_threshold)
    print(format_table(evaluation))
    if args.output:
        print(f"Saved video_metrics.json, video_metrics.csv and frame_metrics.csv in {args.output}")
    return 0


def add_video_subcommands(subparsers) -> None:
    """Register ``video convert``, ``video plan``, ``video export`` and ``video evaluate`` on the CLI's subparsers."""
    video = subparsers.add_parser("video", help="video data tools for Vivim: convert, plan, export, evaluate")
    commands = video.add_subparsers(dest="video_command", required=True)

    convert = commands.add_parser(
        "convert", help="videos (frames/<video>/, masks/<video>/) -> nnU-Net raw dataset of stacked clips")
    convert.add_argument("input", help="folder with frames/<video>/ (or frames/<video>.mp4) and masks/<video>/")
    convert.add_argument("--dataset-id", "-d", type=int, required=True, help="nnU-Net dataset id (1-999)")
    convert.add_argument("--name", default="Video", help="dataset name (Dataset<id>_<name>)")
    convert.add_argument("--raw-root", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    convert.add_argument("--test-input", default=None, help="folder of test videos, same layout (masks optional)")
    convert.add_argument("--clip-length", type=int, default=None,
                         help="split videos into clips of this many frames (default: one case per video)")
    convert.add_argument("--grayscale", action="store_true", help="store one gray channel instead of RGB")
    convert.add_argument("--mask-threshold", type=float, default=None,
                         help="binarise non-binary masks: value >= threshold is foreground (e.g. 128)")
    convert.add_argument("--time-spacing", type=float, default=10.0,
                         help="spacing written for the time axis (> 1 keeps time first in nnU-Net)")
    convert.add_argument("--frames-dir", default="frames", help="name of the frames sub-folder")
    convert.add_argument("--masks-dir", default="masks", help="name of the masks sub-folder")
    convert.set_defaults(func=command_convert)

    plan = commands.add_parser(
        "plan", help="add the Vivim configurations (3d_fullres_vivim, 3d_fullres_vivim_v3) to nnU-Net's plans")
    plan.add_argument("-d", "--dataset", required=True, help="dataset id (501) or name (Dataset501_Polyps)")
    plan.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    plan.add_argument("--preprocessed", default=None, help="nnU-Net preprocessed folder "
                                                           "(default: $nnUNet_preprocessed)")
    plan.add_argument("--frames", type=int, default=5, help="frames per training patch (the paper's 5)")
    plan.add_argument("--max-inplane", type=int, default=256,
                      help="largest in-plane patch size, a multiple of 32 (the paper's 256)")
    plan.set_defaults(func=command_plan)

    export = commands.add_parser("export", help="nnU-Net predictions -> one mask image per frame")
    export.add_argument("predictions", help="folder of nnUNetv2_predict outputs (<case>.nii.gz)")
    export.add_argument("--dataset", required=True, help="the converted raw dataset folder (holds the manifest)")
    export.add_argument("--output", "-o", required=True, help="output folder: <output>/<video>/<frame>.png")
    export.add_argument("--foreground-value", type=int, default=255, help="pixel value of the object (1-255)")
    export.add_argument("--format", default="png", help="image format (png, bmp, tif)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.set_defaults(func=command_export)

    evaluate = commands.add_parser("evaluate", help="per-frame Jaccard/Dice/precision/recall, per video, FPS")
    evaluate.add_argument("predictions", help="predicted masks: <predictions>/<video>/<frame>.png")
    evaluate.add_argument("--reference", "-r", required=True, help="reference masks: <reference>/<video>/<frame>")
    evaluate.add_argument("--output", "-o", default=None, help="folder for video_metrics.{json,csv}")
    speed = evaluate.add_mutually_exclusive_group()
    speed.add_argument("--fps", type=float, default=None, help="inference speed to report (frames per second)")
    speed.add_argument("--inference-seconds", type=float, default=None,
                       help="wall time of the prediction run; FPS = evaluated frames / seconds")
    evaluate.add_argument("--mask-threshold", type=float, default=None,
                          help="binarise non-binary reference masks at this value")
    evaluate.set_defaults(func=command_evaluate)
