"""The pure-PyTorch selective scan against a plain token-by-token reference, plus dispatch and errors."""
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_mamba.ssm import BACKEND_ENV_VAR, BackendError, backend_names, select_backend, selective_scan
from nnunetv2_mamba.ssm.scan import requested_backend_name


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Token-by-token selective scan in float64 (written independently of the library)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    state = torch.zeros(batch, channels, A.shape[1], dtype=torch.float64)

    def at(mat, t):
        if mat.dim() == 2:
            return mat[None]
        if mat.dim() == 3:
            return mat[:, None, :, t]
        return mat[:, :, :, t].repeat_interleave(channels // mat.shape[1], dim=1)

    outputs = []
    for t in range(length):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        outputs.append((state * at(C, t)).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, state


def make_inputs(batch=2, channels=6, d_state=4, length=9, bc="shared", dtype=torch.float64, seed=0,
                with_d=True, with_z=True, with_bias=True):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    u = randn(batch, channels, length)
    delta = randn(batch, channels, length) * 0.5
    A = -torch.rand(channels, d_state, generator=generator, dtype=dtype) * 2 - 0.1
    if bc == "shared":
        B, C = randn(batch, d_state, length), randn(batch, d_state, length)
    elif bc == "grouped":
        B, C = randn(batch, 2, d_state, length), randn(batch, 2, d_state, length)
    else:
        B, C = randn(channels, d_state), randn(channels, d_state)
    D = randn(channels) if with_d else None
    z = randn(batch, channels, length) if with_z else None
    delta_bias = randn(channels) * 0.3 if with_bias else None
    return [u, delta, A, B, C, D, z, delta_bias]


def leaves(inputs):
    return [t.requires_grad_() if t is not None else None for t in inputs]


@pytest.mark.parametrize("length", [1, 7, 64, 333])
@pytest.mark.parametrize("bc", ["shared", "grouped", "time_invariant"])
def test_forward_and_gradients_match_reference_fp64(length, bc, monkeypatch):
    monkeypatch.setenv("NNUNETV2_MAMBA_TORCH_CHUNK", "16")  # several chunks: exercises the carried state
    inputs = leaves(make_inputs(length=length, bc=bc))
    out = selective_scan(*inputs, delta_softplus=True, backend="torch")
    expected, _ = reference_scan(*inputs, delta_softplus=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    wrt = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, wrt, grad_out)
    want = torch.autograd.grad(expected, wrt, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("with_d,with_z,with_bias,softplus", [
    (False, False, False, False), (True, False, False, True), (False, True, False, True),
    (False, False, True, False), (True, True, True, True)])
def test_optional_arguments_fp32(with_d, with_z, with_bias, softplus):
    inputs = make_inputs(length=45, dtype=torch.float32, with_d=with_d, with_z=with_z, with_bias=with_bias)
    inputs = leaves(inputs)
    out = selective_scan(*inputs, delta_softplus=softplus, backend="torch")
    assert out.dtype == torch.float32
    expected, _ = reference_scan(*inputs, delta_softplus=softplus)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    wrt = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out.sum(), wrt)
    want = torch.autograd.grad(expected.sum(), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-3, atol=1e-3)


def test_gradcheck_small():
    inputs = leaves(make_inputs(batch=1, channels=2, d_state=3, length=5, bc="grouped"))
    inputs[3] = inputs[3][:, :1].detach().clone().requires_grad_()  # one group of 2 channels
    inputs[4] = inputs[4][:, :1].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True, backend="torch"),
                                    tuple(inputs))


def test_long_sequence_matches_reference_and_is_chunk_independent(monkeypatch):
    inputs = make_inputs(batch=1, channels=3, d_state=2, length=3000, dtype=torch.float64, seed=3)
    expected, last = reference_scan(*inputs, delta_softplus=True)
    outs = []
    for chunk in ("7", "256", "3000"):
        monkeypatch.setenv("NNUNETV2_MAMBA_TORCH_CHUNK", chunk)
        out, state = selective_scan(*inputs, delta_softplus=True, return_last_state=True, backend="torch")
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(state, last, rtol=1e-9, atol=1e-9)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-12, atol=1e-12)


def test_half_precision_inputs_accumulate_state_in_fp32():
    # The state grows to ~3e5 (> fp16 max 65504) while the output C.h stays ~300: a scan that accumulated in
    # fp16 would overflow to inf; ours keeps the state in fp32 and returns finite fp16 values.
    length, channels = 3000, 2
    u = torch.full((1, channels, length), 100.0)
    delta = torch.ones(1, channels, length)
    A = torch.full((channels, 1), -1e-6)
    B = torch.ones(1, 1, length)
    C = torch.full((1, 1, length), 1e-3)
    out = selective_scan(u.half(), delta.half(), A, B.half(), C.half(), backend="torch")
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    expected, state = reference_scan(u, delta, A, B, C)
    assert state.max() > 65504
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=1e-2)


def test_under_cpu_autocast_output_is_finite_and_matches():
    inputs = make_inputs(length=50, dtype=torch.float32)
    expected, _ = reference_scan(*inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(*[t.bfloat16() if t is not None else None for t in inputs], delta_softplus=True,
                             backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=0.1, atol=0.15)


@pytest.mark.parametrize("index,bad,message", [
    (0, torch.zeros(2, 6), "u must be"),
    (1, torch.zeros(2, 6, 8), "delta must"),
    (2, torch.zeros(5, 4), "A must be"),
    (3, torch.zeros(2, 4, 8), "B must be"),
    (4, torch.zeros(2, 4, 4, 9), "C must be"),
    (5, torch.zeros(5), "D must be"),
    (6, torch.zeros(2, 6, 8), "z must"),
    (7, torch.zeros(2), "delta_bias must be"),
])
def test_bad_shapes_raise_clear_errors(index, bad, message):
    inputs = make_inputs(length=9, dtype=torch.float32)
    inputs[index] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(*inputs)


def test_empty_sequence_is_rejected():
    inputs = make_inputs(length=9, dtype=torch.float32)
    inputs = [t[..., :0] if t is not None and t.dim() == 3 and t.shape[-1] == 9 else t for t in inputs]
    with pytest.raises(ValueError, match="empty"):
        selective_scan(*inputs[:5])


def test_backend_selection_and_errors(monkeypatch):
    inputs = make_inputs(length=5, dtype=torch.float32)
    assert "torch" in backend_names() and "mamba_ssm" in backend_names()
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert select_backend(inputs[0], inputs[2]).name == "torch"  # CPU tensors: only torch supports them
    with pytest.raises(BackendError, match="Unknown selective-scan backend 'cuda_magic'"):
        selective_scan(*inputs, backend="cuda_magic")
    with pytest.raises(BackendError, match="mamba_ssm.*cannot be used"):
        selective_scan(*inputs, backend="mamba_ssm")
    monkeypatch.setenv(BACKEND_ENV_VAR, "mamba_ssm")
    with pytest.raises(BackendError, match=f"\\${BACKEND_ENV_VAR}=mamba_ssm"):
        selective_scan(*inputs)
    monkeypatch.setenv(BACKEND_ENV_VAR, "nonsense")
    with pytest.raises(BackendError, match="Known backends"):
        selective_scan(*inputs)
    monkeypatch.setenv(BACKEND_ENV_VAR, "TORCH")
    assert select_backend(inputs[0], inputs[2]).name == "torch"

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
