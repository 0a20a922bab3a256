"""The Triton instance norm (layers/triton_norm.py) against fp64 torch, and its drop-in module (layers/norm.py).

The kernels run in Triton's CPU interpreter in a subprocess started with TRITON_INTERPRET=1 (Triton reads it when a
kernel is decorated), with tiny tiles so that every row is split over several programs.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nnunetv2_mamba.layers.norm import FAST_NORM_ENV_VAR, InstanceNorm2d, InstanceNorm3d, fast_norm_op

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# (shape, dtype, affine, mean, std): rows split over 5 programs of 64 elements (tiles of 16) and a partial last
# tile; one program per row; a mean 10^4 times the spread (sums of squares in fp32 would lose the variance); 2D.
CASES = [
    ((2, 3, 5, 7, 9), "fp32", True, 0.0, 1.0),
    ((1, 2, 6, 6, 6), "fp32", False, 3.0, 2.0),
    ((2, 2, 3, 4, 5), "fp32", True, 1000.0, 0.1),
    ((2, 4, 9, 13), "fp32", True, -2.0, 5.0),
    ((2, 3, 4, 6, 5), "bf16", True, 1.0, 3.0),
]
# The same kinds of cases for channels-last maps (triton_norm_channels_last.py): tiles of 4 positions x 4 channels,
# programs of 16 elements, so channels are padded (3, 5 -> 4, 8), positions split over programs, last tiles partial.
CHANNELS_LAST_CASES = [
    ((2, 3, 5, 7, 9), "fp32", True, 0.0, 1.0),
    ((1, 5, 6, 6, 6), "fp32", False, 3.0, 2.0),
    ((2, 2, 3, 4, 5), "fp32", True, 1000.0, 0.1),
    ((2, 4, 9, 13), "fp32", True, -2.0, 5.0),
    ((2, 3, 4, 6, 5), "bf16", True, 1.0, 3.0),
]
CASE_IDS = [f"{'x'.join(map(str, c[0]))}-{c[1]}-{'affine' if c[2] else 'plain'}-mean{c[3]:g}" for c in CASES]
CHANNELS_LAST_IDS = [f"channels-last-{case_id}" for case_id in
                     (f"{'x'.join(map(str, c[0]))}-{c[1]}-{'affine' if c[2] else 'plain'}-mean{c[3]:g}"
                      for c in CHANNELS_LAST_CASES)]


def run_case(shape, dtype_name, affine, mean, std, channels_last=False):
    """Return {name: relative error against fp64 F.instance_norm} of y, dx, dweight, dbias, and the kernels' split."""
    import torch.nn.functional as F

    from nnunetv2_mamba.layers import triton_norm, triton_norm_channels_last
    from nnunetv2_mamba.layers.memory_format import channels_last_format

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(len(shape) + int(mean))
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)
    memory_format = channels_last_format(x) if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    module = (InstanceNorm3d if len(shape) == 5 else InstanceNorm2d)(shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            module.weight.copy_(torch.randn(shape[1], generator=generator))
            module.bias.copy_(torch.randn(shape[1], generator=generator))
    leaf = x.clone().requires_grad_()
    y = module(leaf)
    grad = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=memory_format)
    y.backward(grad)
    # fp64 reference on contiguous copies: torch's CPU instance norm backward is wrong for a channels-last gradient
    # (torch 2.14.1: dx off by O(1); see test_torch_cpu_instance_norm_of_channels_last_maps)
    reference = x.double().contiguous().requires_grad_()
    weight = module.weight.detach().double().requires_grad_() if affine else None
    bias = module.bias.detach().double().requires_grad_() if affine else None
    expected = F.instance_norm(reference, weight=weight, bias=bias, eps=module.eps)
    expected.backward(grad.double().contiguous())

    def error(ours, ref):
        return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-6)).item()

    splits = (triton_norm_channels_last._geometry(x[0, 0].numel(), shape[1])[3] if channels_last
              else triton_norm._geometry(x[0, 0].numel())[1])
    result = {"y": error(y, expected), "dx": error(leaf.grad, reference.grad), "dtype_ok": y.dtype == dtype and
              leaf.grad.dtype == dtype, "splits": splits, "fn": type(y.grad_fn).__name__,
              "layout_kept": y.is_contiguous(memory_format=memory_format) and
              leaf.grad.is_contiguous(memory_format=memory_format)}
    if affine:
        result.update(dweight=error(module.weight.grad, weight.grad), dbias=error(module.bias.grad, bias.grad))
    return result


def main():
    from nnunetv2_mamba.layers import triton_norm

    from nnunetv2_mamba.layers import triton_norm_channels_last

    triton_norm.BLOCK, triton_norm.TARGET_ELEMENTS = 16, 64
    triton_norm_channels_last.TILE_ELEMENTS, triton_norm_channels_last.TARGET_ELEMENTS = 16, 64
    for case in CASES:
        print(json.dumps(run_case(*case)), flush=True)
    for case in CHANNELS_LAST_CASES:
        print(json.dumps(run_case(*case, channels_last=True)), flush=True)


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env[FAST_NORM_ENV_VAR] = "1"  # the interpreter runs the norm kernels only when asked
    done = subprocess.run([sys.executable, "-c", "from tests.nnunetv2_mamba.layers.test_instance_norm import main; "
                           "main()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(CASES) + len(CHANNELS_LAST_CASES), done.stdout[-2000:]
    return lines


def check_result(result, case, case_id, expected_splits, expected_fn):
    result = dict(result)
    assert result.pop("dtype_ok") and result.pop("layout_kept"), result
    assert result.pop("fn") == expected_fn, result
    # the rows really were split over programs
    assert result.pop("splits") == expected_splits, result
    shape, dtype, _, mean, std = case
    # fp32: x - mean carries the rounding of the mean, |mean| / std times fp32's epsilon relative to xhat (a mean
    # 10^4 times the spread: ~1e-3; a sum of squares would lose the variance entirely); bf16: rounding of y and dx
    tolerance = 1e-5 + 1e-6 * abs(mean) / std if dtype == "fp32" else 2e-2
    bad = {name: value for name, value in result.items() if not value < tolerance}
    assert not bad, f"case {case_id}: errors above {tolerance}: {bad}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_interpreted_kernels_match_fp64_instance_norm(interpreted_results, index):
    check_result(interpreted_results[index], CASES[index], CASE_IDS[index],
                 -(-math.prod(CASES[index][0][2:]) // 64), "InstanceNormTritonBackward")


@pytest.mark.parametrize("index", range(len(CHANNELS_LAST_CASES)), ids=CHANNELS_LAST_IDS)
def test_interpreted_channels_last_kernels_match_fp64_instance_norm(interpreted_results, index):
    shape = CHANNELS_LAST_CASES[index][0]
    positions, channels_pad = math.prod(shape[2:]), 1 << (shape[1] - 1).bit_length()
    # programs of 16 elements: cdiv(M * C, 64) splits, each a whole number of 16 / C_PAD-position tiles
    tile = max(1, 16 // channels_pad)
    per_program = -(-(-(-positions // -(-(positions * shape[1]) // 64))) // tile) * tile
    check_result(interpreted_results[len(CASES) + index], CHANNELS_LAST_CASES[index], CHANNELS_LAST_IDS[index],
                 -(-positions // per_program), "InstanceNormChannelsLastTritonBackward")


def test_module_is_torch_instance_norm_on_cpu():
    """Without the interpreter a CPU tensor takes torch's path: identical output, same parameters and state_dict."""
    torch.manual_seed(0)
    ours, theirs = InstanceNorm3d(4, affine=True), nn.InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.InstanceNorm3d) and list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 4, 3, 5, 6)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert torch.equal(ours(x), theirs(x))
    unbatched = torch.randn(4, 3, 5, 6)  # (C, D, H, W): torch's unbatched form stays torch's
    torch.testing.assert_close(ours(unbatched), theirs(unbatched))


def test_torch_cpu_instance_norm_of_channels_last_maps():
    """torch's CPU instance norm backward is wrong for a channels-last gradient (torch 2.14.1); our module's CPU
    fallback hands it a contiguous one, so a channels-last map gets the contiguous map's gradient."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6, 6)
    grad = torch.randn_like(x)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last_3d):
        leaf = x.contiguous(memory_format=memory_format).detach().requires_grad_()
        InstanceNorm3d(3)(leaf).backward(grad.contiguous(memory_format=memory_format))
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_wrong_channel_count_says_what_is_wrong():
    with pytest.raises(ValueError, match="has 3 channels, the layer was built for 4"):
        InstanceNorm3d(4, affine=True)(torch.randn(2, 3, 4, 4, 4))


def test_fast_norm_op_swaps_only_instance_norm(monkeypatch):
    monkeypatch.delenv(FAST_NORM_ENV_VAR, raising=False)
    assert fast_norm_op(nn.InstanceNorm3d) is InstanceNorm3d and fast_norm_op(nn.InstanceNorm2d) is InstanceNorm2d
    assert fast_norm_op(nn.BatchNorm3d) is nn.BatchNorm3d and fast_norm_op(None) is None
    monkeypatch.setenv(FAST_NORM_ENV_VAR, "0")
    assert fast_norm_op(nn.InstanceNorm3d) is nn.InstanceNorm3d


def test_builders_use_the_fast_norm_and_load_torch_checkpoints(monkeypatch):
    """The trainers' builders put the Triton-backed class in every instance norm; a network built with torch's
    ($NNUNETV2_MAMBA_FAST_NORM=0) has the same state_dict keys and loads into it."""
    from nnunetv2_mamba.network_architectures.umamba import build_umamba_bot
    from nnunetv2_mamba.plans import NetworkPlan
    from tests.builders import arch_kwargs

    plan = NetworkPlan.from_arch_kwargs(arch_kwargs([8, 16, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]]), [16, 16, 16],
                                        1, 2)
    monkeypatch.delenv(FAST_NORM_ENV_VAR, raising=False)
    fast = build_umamba_bot(plan, True)
    norms = [m for m in fast.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(type(m) is InstanceNorm3d for m in norms)
    monkeypatch.setenv(FAST_NORM_ENV_VAR, "0")
    plain = build_umamba_bot(plan, True)
    assert all(type(m) is nn.InstanceNorm3d for m in plain.modules() if isinstance(m, nn.InstanceNorm3d))
    fast.load_state_dict(plain.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 32, 128, 128, 128), (2, 320, 4, 4, 4), (1, 3, 7, 9, 11), (2, 64, 96, 96)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_gpu_kernels_match_torch_instance_norm(shape, dtype, channels_last):
    torch.manual_seed(0)
    channels = shape[1]
    ours = (InstanceNorm3d if len(shape) == 5 else InstanceNorm2d)(channels, affine=True).cuda()
    theirs = (nn.InstanceNorm3d if len(shape) == 5 else nn.InstanceNorm2d)(channels, affine=True).cuda()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    theirs.double()  # torch's instance norm in fp64: the reference
    memory_format = ({4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if channels_last
                     else torch.contiguous_format)
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=memory_format)
    leaf, reference = x.clone().requires_grad_(), x.double().contiguous().requires_grad_()
    y, expected = ours(leaf), theirs(reference)
    y.backward(grad)
    expected.backward(grad.double().contiguous())
    assert y.dtype == dtype and leaf.grad.dtype == dtype
    assert type(y.grad_fn).__name__ == ("InstanceNormChannelsLastTritonBackward" if channels_last
                                        else "InstanceNormTritonBackward")
    assert y.is_contiguous(memory_format=memory_format) and leaf.grad.is_contiguous(memory_format=memory_format)
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, mine, ref in (("y", y, expected), ("dx", leaf.grad, reference.grad),
                            ("dweight", ours.weight.grad, theirs.weight.grad),
                            ("dbias", ours.bias.grad, theirs.bias.grad)):
        error = ((mine.double() - ref).norm() / ref.norm()).item()
        assert error < tolerance, f"{name}: relative error {error:.2e} above {tolerance}"
