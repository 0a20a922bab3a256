"""GPU: the torch and mamba_ssm backends agree; checkpoints move between backends; fp16 autocast is finite."""
import pytest
import torch

from nnunetv2_mamba.layers import Mamba
from nnunetv2_mamba.layers.precision import run_in_fp32
from nnunetv2_mamba.ssm import get_backend, selective_scan
from tests.nnunetv2_mamba.ssm.test_scan import make_inputs

pytestmark = pytest.mark.gpu

requires_mamba_ssm = pytest.mark.skipif(not get_backend("mamba_ssm").available(),
                                        reason="mamba_ssm is not installed")


def cuda_inputs(dtype, bc, length=300, seed=0):
    inputs = make_inputs(batch=2, channels=16, d_state=8, length=length, bc=bc, dtype=torch.float32, seed=seed)
    moved = []
    for index, t in enumerate(inputs):
        if t is None:
            moved.append(None)
            continue
        # A, D and delta_bias stay fp32 (as in the Mamba layer); the token tensors take the tested dtype.
        keep_fp32 = index in (2, 5, 7) or (index in (3, 4) and t.dim() == 2)
        moved.append(t.cuda().to(torch.float32 if keep_fp32 else dtype).requires_grad_())
    return moved


@requires_mamba_ssm
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-3, 1e-3), (torch.bfloat16, 5e-2, 5e-2)])
@pytest.mark.parametrize("bc", ["shared", "grouped"])
def test_torch_and_mamba_ssm_backends_agree(dtype, rtol, atol, bc):
    inputs = cuda_inputs(dtype, bc)
    results = {}
    for backend in ("torch", "mamba_ssm"):
        out = selective_scan(*inputs, delta_softplus=True, backend=backend)
        grads = torch.autograd.grad(out.float().square().sum(), [t for t in inputs if t is not None])
        results[backend] = (out.float(), [g.float() for g in grads])
    out_t, grads_t = results["torch"]
    out_m, grads_m = results["mamba_ssm"]
    scale = out_m.abs().max()
    torch.testing.assert_close(out_t / scale, out_m / scale, rtol=rtol, atol=atol)
    for g_t, g_m in zip(grads_t, grads_m):
        g_scale = g_m.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g_t / g_scale, g_m / g_scale, rtol=rtol, atol=atol)


@requires_mamba_ssm
@pytest.mark.parametrize("source,target", [("mamba_ssm", "torch"), ("torch", "mamba_ssm")])
def test_layer_checkpoint_moves_between_backends(source, target, tmp_path):
    torch.manual_seed(0)
    layer = Mamba(32, backend=source).cuda()
    torch.save(layer.state_dict(), tmp_path / "layer.pth")
    other = Mamba(32, backend=target).cuda()
    other.load_state_dict(torch.load(tmp_path / "layer.pth"))
    tokens = torch.randn(2, 4096, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(layer(tokens), other(tokens), rtol=1e-3, atol=1e-4)


@requires_mamba_ssm
def test_layer_matches_mamba_ssm_reference_module():
    from mamba_ssm import Mamba as ReferenceMamba

    torch.manual_seed(0)
    reference = ReferenceMamba(d_model=32, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(32).cuda()
    assert {k: v.shape for k, v in reference.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(reference.state_dict())
    tokens = torch.randn(2, 2048, 32, device="cuda")
    with torch.no_grad():
        expected = reference(tokens)
        for backend in ("mamba_ssm", "torch"):
            ours.backend = backend
            torch.testing.assert_close(ours(tokens), expected, rtol=1e-3, atol=1e-4)


@requires_mamba_ssm
@pytest.mark.parametrize("d_conv", [4, 5], ids=["fused_inner_fn", "unfused_width5"])
def test_layer_gradients_agree_between_backends(d_conv):
    """The mamba_ssm path (fused mamba_inner_fn for conv widths 2-4, else conv + scan kernels) gives the torch
    backend's output and gradients for the input and every parameter."""
    torch.manual_seed(0)
    layer = Mamba(32, d_conv=d_conv, backend="torch").cuda()
    tokens = torch.randn(2, 3000, 32, device="cuda", requires_grad=True)
    results = {}
    for backend in ("torch", "mamba_ssm"):
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        tokens.grad = None
        out = layer(tokens)
        out.square().mean().backward()
        results[backend] = [out.detach(), tokens.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    names = ["output", "input grad"] + [name for name, _ in layer.named_parameters()]
    for name, expected, actual in zip(names, results["torch"], results["mamba_ssm"]):
        scale = expected.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("backend", ["torch", "mamba_ssm"])
def test_fp16_autocast_step_on_normalised_tokens_matches_fp32(backend):
    """Under fp16 autocast, on unit-scale tokens (what the networks feed after a LayerNorm), the layer is finite
    and close to its fp32 output, and a GradScaler step leaves finite gradients."""
    if not get_backend(backend).available():
        pytest.skip(f"{backend} is not installed")
    torch.manual_seed(0)
    layer = Mamba(64, backend=backend).cuda()
    tokens = torch.randn(2, 8192, 64, device="cuda", requires_grad=True)
    with torch.no_grad():
        expected = layer(tokens)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = layer(tokens)
        loss = out.float().square().mean()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    scaler.scale(loss).backward()
    for name, parameter in layer.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("backend", ["torch", "mamba_ssm"])
def test_fp32_mixer_policy_keeps_large_activations_finite_under_autocast(backend):
    """Large activations (x30) overflow a bare Mamba layer in fp16, mamba_ssm's own module included (ARCHITECTURES.md §0.6),
    which is why the networks run their mixers through run_in_fp32: there the output and gradients stay finite."""
    if not get_backend(backend).available():
        pytest.skip(f"{backend} is not installed")
    torch.manual_seed(0)
    layer = Mamba(64, backend=backend).cuda()
    tokens = (torch.randn(2, 8192, 64, device="cuda") * 30).half().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        out = run_in_fp32(layer, tokens)
        loss = out.square().mean()
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(tokens.grad).all()
    for name, parameter in layer.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_torch_backend_handles_a_full_resolution_3d_sequence():
    # U-Mamba-Enc stage 0 at 128^3: 2 x 64 channels x 2,097,152 tokens, forward and backward.
    torch.manual_seed(0)
    u = torch.randn(2, 64, 128 ** 3, device="cuda", requires_grad=True)
    delta = torch.rand(2, 64, 128 ** 3, device="cuda") * 0.1
    A = -torch.rand(64, 16, device="cuda") - 0.5
    B = torch.randn(2, 16, 128 ** 3, device="cuda")
    C = torch.randn(2, 16, 128 ** 3, device="cuda")
    out = selective_scan(u, delta, A, B, C, backend="torch")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(u.grad).all()
