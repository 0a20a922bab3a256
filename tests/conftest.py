"""Shared pytest configuration: the ``gpu`` marker skips tests when no CUDA device is visible.

The builders the test modules share (nnU-Net plans, configurations, trainers and batches) are in
tests/builders.py, imported here so that a broken builder fails the collection of every test at once; test
modules import them from there by name.
"""
import pytest
import torch

from tests import builders  # noqa: F401  (see the module docstring)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "e2e: runs nnU-Net's own commands end to end (slow)")
    # mamba_ssm 2.3's mamba_inner_fn calls a torch API deprecated since 2.4, once per call under autocast
    # (hundreds of identical lines on the GPU); it is upstream's and harmless.
    config.addinivalue_line("filterwarnings",
                            "ignore:torch.get_autocast_gpu_dtype\\(\\) is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
