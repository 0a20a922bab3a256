"""``nnunetv2_mamba compare``: the command line of the comparison (registered by nnunetv2_mamba.cli)."""
from __future__ import annotations

import argparse


def _fold(text: str) -> int:
    try:
        fold = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold {text!r} is not an integer (cross-validation folds are 0-4; "
                                         "'all' has no held-out cases to compare)") from None
    if fold < 0:
        raise argparse.ArgumentTypeError(f"fold {fold} is negative")
    return fold


def command_compare(args: argparse.Namespace) -> int:
    """Build the comparison, write its files, print the Markdown table; exit 2 on missing results."""
    from nnunetv2_mamba.compare.comparison import build_comparison
    from nnunetv2_mamba.compare.outputs import format_markdown, write_outputs

    comparison = build_comparison(args.dataset, args.configuration, args.trainers, baseline=args.baseline,
                                  plans=args.plans, folds=args.folds, allow_partial=args.allow_partial,
                                  results_folder=args.results_folder, benchmark_json=args.benchmark_json)
    write_outputs(comparison, args.output)
    print(format_markdown(comparison))
    print(f"\nWrote per_class.csv, other_metrics.csv, comparison.json and index.html to {args.output}")
    return 0


def add_compare_subcommand(subparsers) -> None:
    """Register ``compare`` on the CLI's subparsers."""
    from nnunetv2_mamba.compare.comparison import DEFAULT_FOLDS

    parser = subparsers.add_parser(
        "compare", help="compare trainers on nnU-Net's cross-validation results (per-class Dice, paired tests)",
        description="Pool each trainer's fold_*/validation/summary.json, pair the cases between trainers and "
                    "test each trainer against the baseline per label (Wilcoxon signed-rank, Holm-corrected).")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (Dataset004_Hippocampus)")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer class names")
    parser.add_argument("--baseline", help="trainer the others are tested against (default: the first -tr)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", "--folds", nargs="+", type=_fold, default=list(DEFAULT_FOLDS),
                        help="folds to pool (default 0 1 2 3 4)")
    parser.add_argument("-o", "--output", required=True, help="folder for the CSV, JSON, HTML and PNG files")
    parser.add_argument("--allow-partial", action="store_true",
                        help="report what exists when folds or cases are missing (every output marked partial)")
    parser.add_argument("--results-folder", help="nnU-Net results folder (default $nnUNet_results)")
    parser.add_argument("--benchmark-json",
                        help="benchmarks/benchmark_networks.py --json output: adds parameters, step time, peak "
                             "memory and inference time per trainer")
    parser.set_defaults(func=command_compare)
