"""``nnunetv2_mamba compare``: compare trainers on nnU-Net's cross-validation results (per class, paired tests).

    from nnunetv2_mamba.compare import build_comparison, write_outputs
    comparison = build_comparison("4", "3d_fullres", ["nnUNetTrainer", "nnUNetTrainerUMambaBot"])
    write_outputs(comparison, "comparison_out")
"""
from nnunetv2_mamba.compare.comparison import Comparison, benchmark_network_for, build_comparison
from nnunetv2_mamba.compare.outputs import format_markdown, write_outputs
from nnunetv2_mamba.compare.results import CompareError
from nnunetv2_mamba.compare.stats import holm, paired_wilcoxon

__all__ = ["Comparison", "CompareError", "benchmark_network_for", "build_comparison", "format_markdown", "holm",
           "paired_wilcoxon", "write_outputs"]
