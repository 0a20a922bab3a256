"""Evaluation helpers (video segmentation metrics)."""
