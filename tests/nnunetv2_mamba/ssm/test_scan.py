"""Backend requests that cannot be served: misspelled names get a suggestion, forced unusable backends a reason."""
import pytest
import torch

from nnunetv2_mamba.ssm.scan import BACKEND_ENV_VAR, BackendError, requested_backend_name, select_backend


@pytest.mark.parametrize("name,suggestion", [("mamba-ssm", "mamba_ssm"), ("torhc", "torch"), ("Mamba_SSM ", None),
                                             ("atuo", "auto")])
def test_misspelled_backend_names_get_the_closest_name(name, suggestion, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, name)
    if suggestion is None:  # case and spaces are forgiven
        assert requested_backend_name() == "mamba_ssm"
        return
    with pytest.raises(BackendError) as error:
        requested_backend_name()
    message = str(error.value)
    assert f"Did you mean {suggestion!r}?" in message and "Known backends: " in message and "\n" not in message


def test_forced_backend_that_cannot_run_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "mamba_ssm")
    u, A = torch.zeros(1, 2, 3), -torch.ones(2, 4)
    with pytest.raises(BackendError) as error:
        select_backend(u, A)
    message = str(error.value)
    assert "'mamba_ssm' was requested ($NNUNETV2_MAMBA_BACKEND=mamba_ssm) but cannot be used" in message
    # Not installed here (pip install hint) or installed with CPU tensors (CUDA only): either names the cause.
    assert "pip install" in message or "CUDA" in message
    assert f"unset {BACKEND_ENV_VAR}" in message
