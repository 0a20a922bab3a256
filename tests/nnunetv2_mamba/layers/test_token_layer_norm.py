"""The token LayerNorm (layers/triton_token_norm.py, ``token_layer_norm`` in layers/norm.py) against fp64 torch, and
the U-Mamba layer that uses it with the channel-first out projection (layers/mamba.py).

The kernels run in Triton's CPU interpreter in a subprocess started with TRITON_INTERPRET=1, with small tiles so that
a map's tokens are split over several programs and the last one is partial.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nnunetv2_mamba.layers.norm import FAST_NORM_ENV_VAR, token_layer_norm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# (batch, channels, tokens, input dtype, autocast dtype or None, affine, transposed input, mean, std): C not a power
# of two, a partial last tile, no affine, a map given as a transposed view (strides of a permuted map), bf16 tokens
# from fp32 under autocast (what the bf16 mixer policy asks), bf16 in and out, a mean 10^3 times the spread.
CASES = [
    (2, 5, 37, "fp32", None, True, False, 0.0, 1.0),
    (1, 8, 20, "fp32", None, False, False, 1.0, 2.0),
    (2, 6, 29, "fp32", None, True, True, -1.0, 3.0),
    (2, 12, 33, "fp32", "bf16", True, False, 0.5, 1.0),
    (1, 7, 19, "bf16", None, True, False, 0.0, 2.0),
    (2, 4, 25, "fp32", None, True, False, 1000.0, 1.0),
]
CASE_IDS = [f"{c[0]}x{c[1]}x{c[2]}-{c[3]}{'-autocast-' + c[4] if c[4] else ''}-{'affine' if c[5] else 'plain'}"
            f"{'-strided' if c[6] else ''}-mean{c[7]:g}" for c in CASES]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_case(batch, channels, length, dtype_name, autocast_name, affine, transposed, mean, std):
    """Return {name: relative error against fp64 F.layer_norm} of the tokens, dx, dweight and dbias, and checks."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(channels * length)
    dtype = DTYPES[dtype_name]
    x = (torch.randn(batch, channels, length, generator=generator, dtype=torch.float64) * std + mean).to(dtype)
    if transposed:  # the same values, stored token-major: the kernel reads through the strides
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    norm = nn.LayerNorm(channels, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=generator))
            norm.bias.copy_(torch.randn(channels, generator=generator))
    leaf = x.detach().requires_grad_()
    if autocast_name:
        with torch.autocast("cpu", dtype=DTYPES[autocast_name]):
            tokens = token_layer_norm(leaf, norm)
    else:
        tokens = token_layer_norm(leaf, norm)
    grad = torch.randn(batch, length, channels, generator=generator).to(tokens.dtype)
    tokens.backward(grad)
    reference = x.double().requires_grad_()
    weight = norm.weight.detach().double().requires_grad_() if affine else None
    bias = norm.bias.detach().double().requires_grad_() if affine else None
    expected = F.layer_norm(reference.transpose(1, 2), (channels,), weight, bias, norm.eps)
    expected.backward(grad.double())

    def error(ours, ref):
        return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-6)).item()

    from nnunetv2_mamba.layers import triton_token_norm
    result = {"tokens": error(tokens, expected), "dx": error(leaf.grad, reference.grad),
              "dx_layout": list(leaf.grad.stride()) == list(leaf.stride()),
              "dtypes": [str(tokens.dtype), str(leaf.grad.dtype)], "contiguous": tokens.is_contiguous(),
              "programs": -(-length // triton_token_norm._geometry(channels)[0]), "fn": type(tokens.grad_fn).__name__}
    if affine:
        result.update(dweight=error(norm.weight.grad, weight.grad), dbias=error(norm.bias.grad, bias.grad))
    return result


def run_layer():
    """Return the U-Mamba layer's output and gradients with the Triton LayerNorm vs torch's, as max differences."""
    from nnunetv2_mamba.network_architectures.umamba import UMambaLayer

    torch.manual_seed(0)
    layer = UMambaLayer(6, d_state=4, backend="torch")
    x = torch.randn(2, 6, 3, 4, 5)
    results = {}
    for fast in ("1", "0"):
        os.environ[FAST_NORM_ENV_VAR] = fast
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        out.backward(torch.ones_like(out))
        results[fast] = [out.detach(), leaf.grad, layer.norm.weight.grad.clone(), layer.mamba.in_proj.weight.grad]
    os.environ[FAST_NORM_ENV_VAR] = "1"
    fn = type(token_layer_norm(x.flatten(2).requires_grad_(), layer.norm).grad_fn).__name__  # the layer's path
    return {"max_differences": [(a - b).abs().max().item() for a, b in zip(results["1"], results["0"])],
            "scale": results["0"][0].abs().max().item(), "fn": fn}


def compare_norm_paths(layer, x, gradients):
    """Return {"max_differences", "scale", "calls"} of layer's output and ``gradients(layer)`` (plus x's gradient) with
    the Triton token norm vs torch's ($NNUNETV2_MAMBA_FAST_NORM=1 / 0), and the Triton norm calls made in all."""
    from nnunetv2_mamba.layers import norm as norm_module

    function = norm_module._triton_function("TokenLayerNormTriton")
    apply, calls, runs = function.apply, [], {}
    function.apply = lambda *args: calls.append(1) or apply(*args)
    for fast in ("1", "0"):
        os.environ[FAST_NORM_ENV_VAR] = fast
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        out.square().sum().backward()
        runs[fast] = [out.detach(), leaf.grad] + [grad.clone() for grad in gradients(layer)]
    function.apply = apply
    os.environ[FAST_NORM_ENV_VAR] = "1"
    return {"max_differences": [(a - b).abs().max().item() for a, b in zip(runs["1"], runs["0"])],
            "scale": runs["0"][0].abs().max().item(), "calls": len(calls)}


def run_taming_layer():
    """Return BiSegMamba's stage mixer (outer LayerNorm, two MambaTrans with two norms each, the bidirectional sum's
    LayerNorm: six token norms) compared with torch's norms (``compare_norm_paths``); and the dtypes the two norm entry
    points give under bf16 autocast."""
    from nnunetv2_mamba.layers.norm import stream_layer_norm
    from nnunetv2_mamba.network_architectures.taming import MambaLayer, pan_mamba_trans

    torch.manual_seed(0)
    layer = MambaLayer(6, pan_mamba_trans(6, d_state_cap=4, mamba_backend="torch"))
    x = torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    result = compare_norm_paths(layer, x, lambda m: [
        m.norm.weight.grad, m.mamba.norm.bias.grad, m.mamba.bwd_mamba.norm1.weight.grad,
        m.mamba.bwd_mamba.norm2.bias.grad, m.mamba.bwd_mamba.head.weight.grad])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stream, projected = stream_layer_norm(x.flatten(2), layer.norm), token_layer_norm(x.flatten(2), layer.norm)
    return {**result, "fns": [type(stream.grad_fn).__name__], "dtypes": [str(stream.dtype), str(projected.dtype)]}


def run_vivim_layers():
    """Return, per Vivim mixer, the temporal Mamba layer (two token norms) compared with torch's norms
    (``compare_norm_paths``)."""
    from nnunetv2_mamba.network_architectures.vivim import TemporalMambaLayer

    results = {}
    for mixer in ("alternating", "st_v3"):
        torch.manual_seed(0)
        layer = TemporalMambaLayer(8, mixer, reverse_frames=True, d_state=4, mlp_ratio=2, backend="torch")
        results[mixer] = compare_norm_paths(layer, torch.randn(1, 8, 2, 3, 4), lambda m: [
            m.norm1.weight.grad, m.norm2.bias.grad, m.mamba.in_proj.weight.grad])
    return results


def main():
    from nnunetv2_mamba.layers import triton_token_norm

    triton_token_norm.TILE_ELEMENTS, triton_token_norm.MIN_TOKENS = 32, 4  # several programs per map
    for case in CASES:
        print(json.dumps(run_case(*case)), flush=True)
    print(json.dumps(run_layer()), flush=True)
    print(json.dumps(run_taming_layer()), flush=True)
    print(json.dumps(run_vivim_layers()), flush=True)


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env[FAST_NORM_ENV_VAR] = "1"  # the interpreter runs the norm kernels only when asked
    done = subprocess.run([sys.executable, "-c", "from tests.nnunetv2_mamba.layers.test_token_layer_norm import "
                           "main; main()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(CASES) + 3, done.stdout[-2000:]
    return lines


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_interpreted_kernels_match_fp64_layer_norm(interpreted_results, index):
    result = dict(interpreted_results[index])
    _, channels, length, dtype, autocast, _, _, mean, std = CASES[index]
    out_dtype = autocast or dtype
    assert result.pop("dtypes") == [str(DTYPES[out_dtype]), str(DTYPES[dtype])], result
    assert result.pop("contiguous") and result.pop("fn") == "TokenLayerNormTritonBackward", result
    assert result.pop("dx_layout"), result  # dx has the map's strides (the transposed case: channels last)
    assert result.pop("programs") > 2, result  # the tokens really were split over programs
    # fp32: x - mean carries the mean's rounding, |mean| / std times fp32's epsilon relative to xhat; bf16 tokens or
    # gradients: bf16 rounding
    tolerance = 1e-5 + 1e-6 * abs(mean) / std if out_dtype == "fp32" == dtype else 2e-2
    bad = {name: value for name, value in result.items() if not value < tolerance}
    assert not bad, f"case {CASE_IDS[index]}: errors above {tolerance}: {bad}"


def test_interpreted_umamba_layer_matches_torch_layer_norm(interpreted_results):
    """The U-Mamba layer (token LayerNorm, channel-first out projection) gives torch's LayerNorm path's output and
    gradients ($NNUNETV2_MAMBA_FAST_NORM=0)."""
    result = interpreted_results[-3]
    assert result["fn"] == "TokenLayerNormTritonBackward" and result["scale"] > 0.01
    assert max(result["max_differences"]) < 1e-5, result


def test_interpreted_taming_mixer_matches_torch_layer_norm(interpreted_results):
    """BiSegMamba's stage mixer, every LayerNorm a Triton token norm (a channels-last map), gives torch's LayerNorms'
    output and gradients; under bf16 autocast the residual-stream norm writes fp32 (torch's LayerNorm dtype) and the
    projection-input norm bf16."""
    result = interpreted_results[-2]
    assert result["fns"] == ["TokenLayerNormTritonBackward"] and result["scale"] > 0.01, result
    assert result["calls"] == 6, result  # every norm of the mixer ran the kernel (and none with the fast norm off)
    assert result["dtypes"] == ["torch.float32", "torch.bfloat16"], result
    assert max(result["max_differences"]) < 1e-4, result


@pytest.mark.parametrize("mixer", ["alternating", "st_v3"])
def test_interpreted_vivim_layer_matches_torch_layer_norm(interpreted_results, mixer):
    """Vivim's temporal Mamba layer, both norms Triton token norms, gives torch's LayerNorms' output and gradients."""
    result = interpreted_results[-1][mixer]
    assert result["calls"] == 2 and result["scale"] > 0.01, result
    assert max(result["max_differences"]) < 1e-4, result


def test_cpu_path_is_torch_layer_norm_of_the_tokens():
    """Without the interpreter a CPU map takes torch's LayerNorm of the transposed view: identical values."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(5)
    x = torch.randn(2, 5, 11)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert torch.equal(token_layer_norm(x, norm), norm(x.transpose(1, 2)))


def test_wrong_shape_says_what_is_wrong():
    with pytest.raises(ValueError, match=r"needs a \(batch, channels, tokens\) map with \(4,\) channels"):
        token_layer_norm(torch.randn(2, 3, 10), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="got shape"):
        token_layer_norm(torch.randn(2, 4, 2, 5), nn.LayerNorm(4))


def test_umamba_layer_channel_first_path_matches_tokens_path():
    """The U-Mamba layer's map path (bmm out projection) and its channels-last path give the token path's values and
    gradients on the CPU."""
    from nnunetv2_mamba.layers import run_on_map
    from nnunetv2_mamba.network_architectures.umamba import UMambaLayer

    torch.manual_seed(0)
    layer = UMambaLayer(8, d_state=4, backend="torch")
    x = torch.randn(2, 8, 4, 3, 5)
    outputs, grads = [], []
    channels_last = lambda m: layer(m.contiguous(memory_format=torch.channels_last_3d))  # noqa: E731
    for mix in (layer, lambda m: run_on_map(layer._mix_tokens, m), channels_last):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out = mix(leaf)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([leaf.grad, layer.mamba.out_proj.weight.grad, layer.norm.weight.grad])
    assert outputs[0].shape == x.shape and outputs[0].is_contiguous()
    # a channels-last map gives a channels-last map (no copy), same values
    assert outputs[2].is_contiguous(memory_format=torch.channels_last_3d) and not outputs[2].is_contiguous()
    for other in (1, 2):
        torch.testing.assert_close(outputs[0], outputs[other], rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(grads[0], grads[other]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["no-autocast", "bf16-autocast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 32, 128 ** 3), (2, 320, 64), (1, 3, 1001), (2, 64, 96 * 96)])
def test_gpu_kernels_match_torch_layer_norm(shape, dtype, autocast):
    torch.manual_seed(0)
    channels = shape[1]
    norm = nn.LayerNorm(channels).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference_norm = nn.LayerNorm(channels).cuda().double()
    reference_norm.load_state_dict(norm.state_dict())
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype)
    leaf, reference = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cuda", dtype=autocast or torch.float16, enabled=autocast is not None):
        tokens = token_layer_norm(leaf, norm)
    expected = reference_norm(reference.transpose(1, 2))
    grad = torch.randn(tokens.shape, device="cuda").to(tokens.dtype)
    tokens.backward(grad)
    expected.backward(grad.double())
    assert tokens.dtype == (autocast or dtype) and leaf.grad.dtype == dtype and tokens.is_contiguous()
    assert type(tokens.grad_fn).__name__ == "TokenLayerNormTritonBackward"
    low = torch.float32 not in (dtype, tokens.dtype)
    tolerance = 2e-2 if (low or tokens.dtype is torch.bfloat16 or dtype is torch.bfloat16) else (
        2e-3 if torch.float16 in (dtype, tokens.dtype) else 1e-4)
    for name, mine, ref in (("tokens", tokens, expected), ("dx", leaf.grad, reference.grad),
                            ("dweight", norm.weight.grad, reference_norm.weight.grad),
                            ("dbias", norm.bias.grad, reference_norm.bias.grad)):
        error = ((mine.double() - ref).norm() / ref.norm()).item()
        assert error < tolerance, f"{name}: relative error {error:.2e} above {tolerance}"
