"""mamba-ssm / causal-conv1d built for another GPU architecture or torch version: skipped with a warning."""
import pytest
import torch

from nnunetv2_mamba.ssm.backends import mamba_ssm_backend
from nnunetv2_mamba.ssm.backends.mamba_ssm_backend import MambaSsmBackend, _first_call_failure


def _no_kernel_image():
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n"
                       "CUDA kernel errors might be asynchronously reported at some other API call")


def test_first_call_failure_names_the_cause_and_the_fix():
    with pytest.warns(RuntimeWarning, match="automatic backend choice skips it"):
        reason = _first_call_failure("mamba-ssm", torch.device("cpu"), _no_kernel_image)
    assert "mamba-ssm is installed but its CUDA kernel does not run on cpu" in reason
    assert "built for another GPU architecture or torch/CUDA version" in reason
    assert "RuntimeError: CUDA error: no kernel image is available" in reason and "\n" not in reason
    assert "pip install --force-reinstall" in reason and "--no-binary mamba-ssm mamba-ssm" in reason


def test_other_first_call_errors_are_reported_too():
    def fails():
        raise ValueError("something else")
    with pytest.warns(RuntimeWarning):
        reason = _first_call_failure("causal-conv1d", torch.device("cpu"), fails)
    assert "its first kernel call fails (ValueError: something else)" in reason


def test_a_running_kernel_is_no_failure():
    assert _first_call_failure("mamba-ssm", torch.device("cpu"), lambda: torch.ones(1)) is None


def test_broken_causal_conv1d_turns_the_fused_paths_off(monkeypatch):
    monkeypatch.setattr(mamba_ssm_backend, "_import_causal_conv1d", lambda: object())
    monkeypatch.setattr(mamba_ssm_backend, "_current_cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(mamba_ssm_backend, "_conv_kernel_failure", lambda device: "broken build")
    backend = MambaSsmBackend()
    assert backend.causal_conv1d() is None and backend.fused_mamba_inner() is None
    monkeypatch.setattr(mamba_ssm_backend, "_conv_kernel_failure", lambda device: None)
    assert backend.causal_conv1d() is not None


@pytest.mark.gpu
def test_broken_scan_kernel_falls_back_in_automatic_mode_and_fails_clearly_when_forced(monkeypatch):
    from nnunetv2_mamba.ssm.scan import BACKEND_ENV_VAR, BackendError, select_backend

    def broken(*args, **kwargs):
        _no_kernel_image()
    monkeypatch.setattr(mamba_ssm_backend, "_import_selective_scan", lambda: (broken, None))
    mamba_ssm_backend._scan_kernel_failure.cache_clear()
    try:
        u, A = torch.zeros(1, 2, 3, device="cuda"), -torch.ones(2, 4, device="cuda")
        monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
        with pytest.warns(RuntimeWarning, match="no kernel image"):
            assert select_backend(u, A).name != "mamba_ssm"
        monkeypatch.setenv(BACKEND_ENV_VAR, "mamba_ssm")
        with pytest.raises(BackendError, match="built for another GPU architecture"):
            select_backend(u, A)
    finally:
        mamba_ssm_backend._scan_kernel_failure.cache_clear()


@pytest.mark.gpu
def test_installed_mamba_ssm_kernels_run_on_this_gpu():
    if mamba_ssm_backend._import_selective_scan()[0] is None:
        pytest.skip("mamba-ssm is not installed")
    assert mamba_ssm_backend._scan_kernel_failure(torch.device("cuda", 0)) is None
