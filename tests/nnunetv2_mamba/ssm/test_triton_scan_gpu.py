"""GPU: the Triton scan against an fp64 reference and mamba_ssm's kernel, forward and every gradient."""
import pytest
import torch

from nnunetv2_mamba.ssm import get_backend, selective_scan

pytestmark = pytest.mark.gpu

TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-2), torch.bfloat16: (3e-3, 5e-2)}


def poison_allocator():
    """Fill freed allocator memory with NaN so that an output element the kernels never write shows up."""
    filler = torch.full((64 * 2 ** 20,), float("nan"), device="cuda")
    del filler


def make_cuda_inputs(batch, channels, d_state, length, bc, dtype, seed, with_optional=True):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda")

    u = randn(batch, channels, length).to(dtype)
    delta = (randn(batch, channels, length) * 0.5 - 1.0).to(dtype)
    A = -torch.exp(torch.rand(channels, d_state, generator=generator, device="cuda") * 2.5)
    shape = (batch, d_state, length) if bc == "shared" else (batch, 2, d_state, length)
    B, C = randn(*shape).to(dtype), randn(*shape).to(dtype)
    D = randn(channels) if with_optional else None
    z = randn(batch, channels, length).to(dtype) if with_optional else None
    bias = randn(channels) * 0.3 if with_optional else None
    return [u, delta, A, B, C, D, z, bias]


def forward_and_grads(backend, inputs, weight, double=False):
    leaves = [None if t is None else (t.double() if double else t).detach().requires_grad_() for t in inputs]
    poison_allocator()
    out, last = selective_scan(*leaves, delta_softplus=True, return_last_state=True, backend=backend)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out.double() * weight).sum(), present)
    return out.double(), last.double(), [g.double() for g in grads]


def assert_matches(ours, reference, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    # Compared relative to the largest reference value; the floor covers references that are exactly zero
    # (dA at L = 1), where the kernels leave FMA rounding residues of ~1e-9.
    scale = reference.abs().max().clamp_min(1e-2)
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (unwritten elements?)"
    torch.testing.assert_close(ours / scale, reference / scale, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check(batch, channels, length, bc, dtype, with_optional=True, seed=0, d_state=16):
    inputs = make_cuda_inputs(batch, channels, d_state, length, bc, dtype, seed, with_optional)
    weight = torch.randn(batch, channels, length, device="cuda", dtype=torch.float64)
    out, last, grads = forward_and_grads("triton", inputs, weight)
    # The fp64 torch scan on the same (rounded) inputs is the ground truth; mamba_ssm must agree as closely.
    ref_out, ref_last, ref_grads = forward_and_grads("torch", inputs, weight, double=True)
    assert out.dtype == ref_out.dtype
    assert_matches(out, ref_out, dtype, "out")
    assert_matches(last, ref_last, dtype, "last_state")
    names = [n for n, t in zip("u delta A B C D z delta_bias".split(), inputs) if t is not None]
    for name, g, r in zip(names, grads, ref_grads):
        assert_matches(g, r, dtype, f"grad {name}")
    if get_backend("mamba_ssm").available():
        m_out, _, m_grads = forward_and_grads("mamba_ssm", inputs, weight)
        assert_matches(out, m_out, dtype, "out vs mamba_ssm")
        for name, g, m in zip(names, grads, m_grads):
            assert_matches(g, m, dtype, f"grad {name} vs mamba_ssm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("length", [1, 7, 2048, 2049, 65536])
@pytest.mark.parametrize("bc", ["shared", "grouped"])
def test_triton_matches_reference_and_mamba_ssm(dtype, length, bc):
    check(2, 8, length, bc, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [2049, 65536])
@pytest.mark.parametrize("bc", ["shared", "grouped"])
@pytest.mark.parametrize("d_state", [24, 32, 64])
def test_larger_states_match_reference_and_mamba_ssm(d_state, bc, length, dtype):
    """The d_state-32 / 64 tilings (TILINGS); 24 states are padded to 32; the grouped B/C's 10 channels per group
    take 2-channel tiles (the interpreter cases cover a partly masked tile)."""
    check(2, 20, length, bc, dtype, d_state=d_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_without_optional_arguments(dtype):
    check(2, 8, 2049, "shared", dtype, with_optional=False)


def test_full_volume_length_small_channels():
    check(1, 4, 128 ** 3, "shared", torch.float32)


def test_segment_length_does_not_change_the_result(monkeypatch):
    """Segments of 8 chunks (the default), 1 chunk (a carry over every chunk) and 64 chunks (a long walk per
    program) give the same output and gradients, over a sequence whose last segment is partly padding."""
    inputs = make_cuda_inputs(2, 64, 16, 65536 + 3, "shared", torch.float32, 0)
    results = {}
    for segment in ("8", "1", "64"):
        monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_SEGMENT", segment)
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
        out = selective_scan(*leaves, delta_softplus=True, backend="triton")
        results[segment] = [out] + list(torch.autograd.grad(out.square().sum(), [t for t in leaves if t is not None]))
    for other in ("1", "64"):
        for default, value in zip(results["8"], results[other]):
            torch.testing.assert_close(value, default, rtol=1e-4, atol=1e-5)


def test_output_dtypes_follow_inputs():
    inputs = make_cuda_inputs(1, 4, 16, 100, "shared", torch.bfloat16, 0)
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    out = selective_scan(*leaves, delta_softplus=True, backend="triton")
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), [t for t in leaves if t is not None])
    assert [g.dtype for g in grads] == [t.dtype for t in leaves if t is not None]


@pytest.mark.skipif(not get_backend("mamba_ssm").available(), reason="mamba_ssm is not installed")
@pytest.mark.parametrize("triton_conv", ["0", "1"], ids=["torch_conv", "triton_conv"])
def test_mamba_layer_on_triton_matches_mamba_ssm_layer(triton_conv, monkeypatch):
    from nnunetv2_mamba.layers import Mamba

    monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_CONV", triton_conv)

    torch.manual_seed(0)
    layer = Mamba(32, backend="mamba_ssm").cuda()
    tokens = torch.randn(2, 4099, 32, device="cuda")
    results = {}
    for backend in ("mamba_ssm", "triton"):
        layer.backend = backend
        layer.zero_grad()
        out = layer(tokens)
        out.square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    out_m, grads_m = results["mamba_ssm"]
    out_t, grads_t = results["triton"]
    torch.testing.assert_close(out_t, out_m, rtol=1e-3, atol=1e-4)
    for name, grad in grads_m.items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_t[name] / scale, grad / scale, rtol=6e-4, atol=2e-3, msg=name)


def test_fused_triton_layer_matches_unfused_under_bf16_autocast(monkeypatch):
    """$NNUNETV2_MAMBA_TRITON_FUSED=1 (triton_layer.py) against the unfused layer path, as the networks run it."""
    from nnunetv2_mamba.layers import Mamba

    torch.manual_seed(0)
    layer = Mamba(d_model=32, d_state=16, backend="triton").cuda()
    tokens = torch.randn(2, 32768, 32, device="cuda")
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_FUSED", flag)
        layer.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            out = layer(x)
        kept = torch.cuda.memory_allocated() - start
        out.float().square().mean().backward()
        results[flag] = (out.detach().float(), [x.grad] + [p.grad for p in layer.parameters()], kept)
    (out0, grads0, kept0), (out1, grads1, kept1) = results["0"], results["1"]
    assert torch.allclose(out1, out0, rtol=2e-2, atol=2e-2)
    for unfused, fused in zip(grads0, grads1):
        assert fused is not None and torch.isfinite(fused).all()
        assert (fused.float() - unfused.float()).norm() <= 5e-2 * unfused.float().norm() + 1e-6
    assert kept1 < 0.7 * kept0, (kept0, kept1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [3, 4099, 2 ** 21])
def test_triton_causal_conv_matches_torch_conv(dtype, length):
    """triton_conv.py on the GPU, x the strided half of a token-major in-projection (as the layer passes it): output
    and the three gradients against torch's grouped conv in fp64, up to 2 x 128^3 tokens."""
    import torch.nn.functional as F

    from nnunetv2_mamba.ssm.backends.triton_conv import causal_conv1d_silu

    generator = torch.Generator(device="cuda").manual_seed(length)
    channels, width = 64, 4
    x = torch.randn(2, length, 2 * channels, generator=generator, device="cuda").to(dtype).transpose(1, 2)[:, :channels]
    weight = torch.randn(channels, width, generator=generator, device="cuda")
    bias = torch.randn(channels, generator=generator, device="cuda")
    leaves = [x.detach().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    poison_allocator()
    out = causal_conv1d_silu(*leaves)
    grad = torch.randn(out.shape, generator=generator, device="cuda").to(dtype)
    out.backward(grad)
    references = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = F.silu(F.conv1d(references[0], references[1][:, None, :], references[2], padding=width - 1,
                               groups=channels)[..., :length])
    expected.backward(grad.double())
    assert out.dtype == dtype and out.stride(1) == 1
    assert_matches(out.double(), expected, dtype, "out")
    for name, ours, ref in zip(("dx", "dweight", "dbias"), leaves, references):
        assert_matches(ours.grad.double(), ref.grad, dtype, name)
