"""The Triton scan and causal-conv kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) against fp64 references.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the cases run in one subprocess started with the
variable set (this process may already have imported triton); each test checks one case's errors.
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHUNK = 4  # tiny chunks: short sequences already span several chunks and cross chunk boundaries
SEGMENT = 2  # chunks per segment: from 3 chunks on, several segments and a carry between them
# (length, B/C layout, batch, channels, with D/z/delta_bias, delta_softplus)
CASES = [
    (1, "shared", 1, 4, True, True),
    (7, "shared", 2, 4, True, True),
    (CHUNK, "grouped", 1, 4, True, True),
    (CHUNK + 1, "time_invariant", 1, 4, True, True),
    (3 * CHUNK - 1, "shared", 2, 4, True, True),
    (3 * CHUNK - 1, "grouped", 1, 8, True, True),  # 4 channels per group over 2 programs: atomic dB/dC
    (3 * CHUNK - 1, "time_invariant", 1, 4, True, False),
    (2 * CHUNK + 3, "shared", 1, 6, False, True),  # 6 channels: a partly masked channel block
    (2 * CHUNK + 3, "grouped", 1, 4, False, False),
    (3 * CHUNK - 1, "grouped_B_shared_C", 1, 4, True, True),
    (3 * CHUNK - 1, "shared_d_state_3", 1, 4, True, True),  # d_state padded to 4 lanes inside the kernels
    # the larger states' tilings (TILINGS: 4 channels per tile, so 10 channels leave the third tile half masked;
    # d_state 64 with 4 channels per group over 2 groups)
    (3 * CHUNK - 1, "shared_d_state_32", 2, 10, True, True),
    (3 * CHUNK - 1, "grouped_d_state_64", 1, 8, True, True),
    # 7 chunks = 4 segments (the last one half padding): the two-level carry over the segments
    (7 * CHUNK - 3, "shared", 2, 4, True, True),
    (7 * CHUNK - 3, "grouped", 1, 8, True, True),
]
CASE_IDS = [f"L{c[0]}-{c[1]}-b{c[2]}-d{c[3]}-{'opt' if c[4] else 'bare'}-{'softplus' if c[5] else 'raw'}"
            for c in CASES]


def run_case(length, bc, batch, channels, with_optional, softplus):
    """Return {name: relative error} of output, last state and every gradient against the fp64 reference."""
    import torch

    from nnunetv2_mamba.ssm import selective_scan
    from tests.nnunetv2_mamba.ssm.test_scan import make_inputs, reference_scan

    layout = bc.split("_")[0]
    inputs = make_inputs(batch=batch, channels=channels, d_state=int(bc.rsplit("_", 1)[1]) if "d_state" in bc else 4,
                         length=length, bc=layout, dtype=torch.float32, seed=length, with_d=with_optional,
                         with_z=with_optional, with_bias=with_optional)
    if bc == "grouped_B_shared_C":
        inputs[4] = inputs[4][:, 0].contiguous()
    names = [n for n, t in zip("u delta A B C D z delta_bias".split(), inputs) if t is not None]
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out, last = selective_scan(*leaves, delta_softplus=softplus, return_last_state=True, backend="triton")
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weight).sum(), [t for t in leaves if t is not None])
    ref_leaves = [None if t is None else t.double().requires_grad_() for t in inputs]
    ref_out, ref_last = reference_scan(*ref_leaves, delta_softplus=softplus)
    ref_grads = torch.autograd.grad((ref_out * weight).sum(), [t for t in ref_leaves if t is not None])

    def error(ours, ref):  # relative to the reference's size; absolute where the reference is ~0 (dA at L=1)
        return ((ours.double() - ref).norm() / ref.norm().clamp_min(1.0)).item()

    errors = {"out": error(out, ref_out), "last_state": error(last, ref_last),
              "out_dtype_ok": float(out.dtype == torch.float32)}
    errors.update({f"grad_{n}": error(g, r) for n, g, r in zip(names, grads, ref_grads)})
    return errors


@contextlib.contextmanager
def saved_storages(left_out):
    """Yield {storage address: bytes} of what autograd saves for the backward inside the block (each storage once),
    the storages whose addresses are in ``left_out`` excepted."""
    import torch

    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in left_out:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def storage_addresses(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


def segments_case():
    """Return what the scan saves for its backward beyond its inputs, and the largest output and gradient
    differences between segments of 2 chunks (the other cases), 1 chunk and 4 chunks
    ($NNUNETV2_MAMBA_TRITON_SEGMENT): the split into segments must not change the result."""
    import torch

    from nnunetv2_mamba.ssm import selective_scan
    from tests.nnunetv2_mamba.ssm.test_scan import make_inputs

    inputs = make_inputs(batch=2, channels=4, d_state=4, length=9 * CHUNK - 1, bc="shared", dtype=torch.float32,
                         seed=3, with_d=True, with_z=True, with_bias=True)
    result, outputs = {}, {}
    for segment in ("2", "1", "4"):
        os.environ["NNUNETV2_MAMBA_TRITON_SEGMENT"] = segment
        leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        with saved_storages(storage_addresses(leaves)) as extra:
            out = selective_scan(*leaves, delta_softplus=True, backend="triton")
        outputs[segment] = [out] + list(torch.autograd.grad(out.sum(), [t for t in leaves if t is not None]))
        result[f"extra_saved_bytes_{segment}"] = sum(extra.values())
    os.environ["NNUNETV2_MAMBA_TRITON_SEGMENT"] = str(SEGMENT)
    result["max_difference"] = max((a - b).abs().max().item() for other in ("1", "4")
                                   for a, b in zip(outputs["2"], outputs[other]))
    return result


def fused_layer_case():
    """Return the largest differences between the Mamba layer on the Triton backend with the fused inner Function
    ($NNUNETV2_MAMBA_TRITON_FUSED=1) and the unfused path, and the bytes each keeps for the backward."""
    import torch

    from nnunetv2_mamba.layers import Mamba

    torch.manual_seed(0)
    layer = Mamba(d_model=8, d_state=4, backend="triton")
    tokens = torch.randn(2, 3 * CHUNK - 1, 8, generator=torch.Generator().manual_seed(2))
    results, grads, outputs = {}, {}, {}
    os.environ["NNUNETV2_MAMBA_TRITON_CONV"] = "1"  # the unfused path with the Triton conv the fused Function uses
    for mode, flag in (("unfused", "0"), ("fused", "1")):
        os.environ["NNUNETV2_MAMBA_TRITON_FUSED"] = flag
        layer.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_()
        with saved_storages(storage_addresses([x, *layer.parameters()])) as saved:
            out = layer(x)
        out.square().sum().backward()
        outputs[mode] = out.detach()
        grads[mode] = [x.grad] + [p.grad for p in layer.parameters()]
        results[f"saved_bytes_{mode}"] = sum(saved.values())
    results["max_output_difference"] = (outputs["fused"] - outputs["unfused"]).abs().max().item()
    results["max_grad_difference"] = max((a - b).abs().max().item() for a, b in zip(grads["fused"], grads["unfused"]))
    results["grads_present"] = all(g is not None for g in grads["fused"])
    return results


# (batch, channels, length, width, bias, x layout, dtype): several forward tiles (64 tokens) and backward programs
# (16 tiles of 16 tokens), a partly masked channel block (32 channels), sequences shorter than the conv, the layer's
# strided half of xz, bf16.
CONV_CASES = [
    (2, 6, 37, 4, True, "contiguous", "fp32"),
    (2, 4, 600, 4, True, "xz_half", "fp32"),
    (1, 40, 130, 4, True, "xz_half", "fp32"),
    (2, 5, 3, 4, False, "contiguous", "fp32"),
    (1, 3, 1, 3, True, "xz_half", "fp32"),
    (1, 8, 20, 2, True, "xz_half", "bf16"),
]
CONV_IDS = [f"b{c[0]}-d{c[1]}-L{c[2]}-w{c[3]}-{'bias' if c[4] else 'nobias'}-{c[5]}-{c[6]}" for c in CONV_CASES]


def conv_case(batch, channels, length, width, with_bias, layout, dtype_name):
    """Return the relative errors of the Triton causal conv1d + SiLU (output, dx, dweight, dbias) against an fp64
    torch conv, the output's layout and the bytes it saves beyond its inputs."""
    import torch
    import torch.nn.functional as F

    from nnunetv2_mamba.ssm.backends.triton_conv import causal_conv1d_silu

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(length)
    if layout == "xz_half":  # x as the layer passes it: half of the token-major in-projection, not copied
        x = torch.randn(batch, length, 2 * channels, generator=generator).to(dtype).transpose(1, 2)[:, :channels]
    else:
        x = torch.randn(batch, channels, length, generator=generator).to(dtype)
    weight = torch.randn(channels, width, generator=generator)
    bias = torch.randn(channels, generator=generator) if with_bias else None
    leaves = [x.detach().requires_grad_(), weight.clone().requires_grad_(),
              None if bias is None else bias.clone().requires_grad_()]
    with saved_storages(storage_addresses(leaves)) as extra:
        out = causal_conv1d_silu(*leaves)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    out.backward(grad)
    references = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = F.silu(F.conv1d(references[0], references[1][:, None, :], references[2], padding=width - 1,
                               groups=channels)[..., :length])
    expected.backward(grad.double())

    def error(ours, ref):
        return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-3)).item()

    result = {"out": error(out, expected), "token_major": out.stride(1) == 1, "dtype_ok": out.dtype == dtype and
              leaves[0].grad.dtype == dtype and leaves[1].grad.dtype == torch.float32, "extra_saved_bytes": sum(extra.values())}
    for name, ours, ref in zip(("dx", "dweight", "dbias"), leaves, references):
        if ours is not None:
            result[name] = error(ours.grad, ref.grad)
    return result


def layer_copies_case():
    """Return the copies (op, elements) of tensors of at least batch x length x d_inner elements that the triton
    layer's forward + backward makes, and the elementwise ops whose operands differ in layout: the kernels read and
    write through strides, so every such copy is avoidable traffic (a transposing copy on the GPU)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from nnunetv2_mamba.layers import Mamba

    os.environ.pop("NNUNETV2_MAMBA_TRITON_FUSED", None)  # the default layer: unfused, Triton conv
    os.environ.pop("NNUNETV2_MAMBA_TRITON_CONV", None)
    batch, length, d_model = 2, 3 * CHUNK + 5, 8
    layer = Mamba(d_model=d_model, d_state=4, backend="triton")
    smallest = batch * length * layer.d_inner
    copies, mixed = [], []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]  # the interpreter's
            # own argument copies are flat
            if name.startswith(("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")) and tensors \
                    and tensors[0].numel() >= smallest:
                copies.append([name, tensors[0].numel()])
            if name.startswith(("aten.add", "aten.mul", "aten.sub")) and len(tensors) == 2 \
                    and tensors[0].shape == tensors[1].shape and tensors[0].stride() != tensors[1].stride() \
                    and 0 not in tensors[0].stride() + tensors[1].stride():  # not a broadcast gradient
                mixed.append([name, list(tensors[0].stride()), list(tensors[1].stride())])
            return out

    tokens = torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with Recorder():
        layer(tokens).square().sum().backward()
    return {"copies": copies, "mixed_layout_ops": mixed, "grads_present": all(
        p.grad is not None for p in layer.parameters()) and tokens.grad is not None}


def main():
    for case in CASES:
        print(json.dumps(run_case(*case)), flush=True)
    print(json.dumps(segments_case()), flush=True)
    print(json.dumps(fused_layer_case()), flush=True)
    for case in CONV_CASES:
        print(json.dumps(conv_case(*case)), flush=True)
    print(json.dumps(layer_copies_case()), flush=True)


@pytest.fixture(scope="module")
def interpreted_results():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    # Carry tiles of 2 segments in superblocks of 2: the two-level carry runs from 3 segments on.
    env = dict(os.environ, TRITON_INTERPRET="1", NNUNETV2_MAMBA_TRITON_CHUNK=str(CHUNK),
               NNUNETV2_MAMBA_TRITON_SEGMENT=str(SEGMENT), NNUNETV2_MAMBA_TRITON_CARRY="2,2",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", "from tests.nnunetv2_mamba.ssm.test_triton_scan import main; main()"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(CASES) + 2 + len(CONV_CASES) + 1, done.stdout[-2000:]
    return lines


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_interpreted_kernels_match_fp64_reference(interpreted_results, index):
    errors = interpreted_results[index]
    assert errors.pop("out_dtype_ok") == 1.0
    assert set(errors) >= {"out", "last_state", "grad_u", "grad_delta", "grad_A", "grad_B", "grad_C"}
    bad = {name: value for name, value in errors.items() if not value < 2e-5}  # fp32 kernels: ~1e-7 expected
    assert not bad, f"case {CASE_IDS[index]}: errors above 2e-5: {bad}"


def test_default_segments_and_carry_match_fp64_reference():
    """Segments and carry as shipped (8 chunks per segment, carry tiles of 8 segments, superblocks sized to the
    sequence; the other tests force tiny ones), chunks of 2 tokens: L = 10 is one segment of 5 chunks (no carry),
    L = 40 three segments (one carry level), L = 299 19 segments (superblocks of 8: two levels)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {k: v for k, v in os.environ.items() if k not in ("NNUNETV2_MAMBA_TRITON_CARRY",
                                                            "NNUNETV2_MAMBA_TRITON_SEGMENT")}
    env.update(TRITON_INTERPRET="1", NNUNETV2_MAMBA_TRITON_CHUNK="2",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import json, torch; from tests.nnunetv2_mamba.ssm.test_triton_scan import run_case; "
            "from nnunetv2_mamba.ssm.backends.triton_scan import _superblock, make_plan; "
            "plans = [make_plan(torch.empty(1, 4, L), torch.empty(4, 4), torch.empty(1, 4, L), "
            "torch.empty(1, 4, L))[0] for L in (10, 40, 299)]; "
            "print(json.dumps([[p.n_segments, _superblock(p.n_segments)] for p in plans] "
            "+ [run_case(L, 'shared', 1, 4, True, True) for L in (10, 40, 299)]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    geometry, cases = results[:3], results[3:]
    assert geometry == [[1, 8], [3, 8], [19, 8]], geometry  # 19 segments > one superblock of 8: two levels
    for errors in cases:
        errors.pop("out_dtype_ok")
        bad = {name: value for name, value in errors.items() if not value < 2e-5}
        assert not bad, bad


def test_tiling_follows_d_state_and_explicit_settings_win(monkeypatch):
    import torch

    from nnunetv2_mamba.ssm.backends.triton_scan import TILINGS, make_plan

    def plan(d_state, **settings):
        p = make_plan(torch.empty(1, 64, 4096), torch.empty(64, d_state), torch.empty(1, d_state, 4096),
                      torch.empty(1, d_state, 4096), **settings)[0]
        return p.chunk, p.block_d, p.warps, p.grad_warps

    assert [plan(n) for n in (1, 16, 17, 32, 64)] == [TILINGS[16], TILINGS[16], TILINGS[32], TILINGS[32], TILINGS[64]]
    assert len({plan(n) for n in (16, 32, 64)}) == 3  # the larger states do get their own tilings
    assert plan(32, chunk=4, block_d=2, warps=2) == (4, 2, 2, 2)  # explicit warps: every kernel's
    assert plan(32, warps=1, grad_warps=4)[2:] == (1, 4)
    monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_TILING", "8:2:4")
    assert plan(16) == plan(64) == (8, 2, 4, 4)
    assert plan(64, warps=1) == (8, 2, 1, 1)
    monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_TILING", "16:4:1:8")
    assert plan(16) == (16, 4, 1, 8)


@pytest.mark.parametrize("value", ["8:2", "8:two:4", "0:4:1", "16:4:1:2:2"])
def test_bad_tiling_setting_says_what_is_wrong(monkeypatch, value):
    import torch

    from nnunetv2_mamba.ssm.backends.triton_scan import make_plan

    monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_TILING", value)
    with pytest.raises(ValueError, match="NNUNETV2_MAMBA_TRITON_TILING must be 'T:BLOCK_D:WARPS"):
        make_plan(torch.empty(1, 4, 40), torch.empty(4, 4), torch.empty(1, 4, 40), torch.empty(1, 4, 40))


@pytest.mark.parametrize("value", ["0", "eight", "-2"])
def test_bad_segment_setting_says_what_is_wrong(monkeypatch, value):
    import torch

    from nnunetv2_mamba.ssm.backends.triton_scan import make_plan

    monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_SEGMENT", value)
    with pytest.raises(ValueError, match="NNUNETV2_MAMBA_TRITON_SEGMENT must be a whole number of chunks >= 1"):
        make_plan(torch.empty(1, 4, 40), torch.empty(4, 4), torch.empty(1, 4, 40), torch.empty(1, 4, 40))


def test_segments_change_nothing_and_nothing_is_saved_beyond_the_inputs(interpreted_results):
    """Segments of 1, 2 or 4 chunks give the same output and gradients (35 tokens: 9 chunks, 9 / 5 / 3 segments,
    the last partly padding), and the scan saves nothing for its backward beyond its inputs (mamba_ssm keeps its
    output as well)."""
    result = interpreted_results[len(CASES)]
    assert [result[f"extra_saved_bytes_{s}"] for s in ("1", "2", "4")] == [0, 0, 0], result
    assert result["max_difference"] < 1e-5, result


def test_fused_mamba_layer_matches_the_unfused_path_and_keeps_less(interpreted_results):
    """$NNUNETV2_MAMBA_TRITON_FUSED=1: the layer's inner part as one Function (triton_layer.py) gives the unfused
    path's output and every gradient, and keeps less for the backward (xz and out_proj's input only)."""
    fused = interpreted_results[len(CASES) + 1]
    assert fused["grads_present"], fused
    assert fused["max_output_difference"] < 1e-6 and fused["max_grad_difference"] < 1e-5, fused
    assert fused["saved_bytes_fused"] < 0.6 * fused["saved_bytes_unfused"], fused


@pytest.mark.parametrize("index", range(len(CONV_CASES)), ids=CONV_IDS)
def test_interpreted_causal_conv_matches_torch_conv(interpreted_results, index):
    """The Triton causal conv1d + SiLU (triton_conv.py): output and every gradient as torch's grouped conv in fp64,
    the output stored token-major, nothing saved beyond the inputs."""
    result = interpreted_results[len(CASES) + 2 + index]
    assert result.pop("token_major") and result.pop("dtype_ok"), result
    assert result.pop("extra_saved_bytes") == 0, result
    tolerance = 2e-5 if CONV_CASES[index][-1] == "fp32" else 1e-2  # bf16: the rounding of out and dx
    bad = {name: value for name, value in result.items() if not value < tolerance}
    assert not bad, f"case {CONV_IDS[index]}: errors above {tolerance}: {bad}"


def test_triton_layer_makes_no_copies_around_the_kernels(interpreted_results):
    """The Mamba layer on the triton backend (Triton conv, the default): no transposing copy of a (batch, length,
    d_inner)-sized tensor in the forward or the backward (out_proj's input, ddelta, dxz used to be copied), and no
    elementwise op on operands of different layouts (du + x_proj's gradient used to be one)."""
    result = interpreted_results[-1]
    assert result["grads_present"], result
    assert result["copies"] == [] and result["mixed_layout_ops"] == [], result


def test_backend_is_unavailable_for_cpu_tensors_without_the_interpreter():
    import torch

    from nnunetv2_mamba.ssm import get_backend

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs under TRITON_INTERPRET")
    reason = get_backend("triton").unsupported_reason(torch.zeros(1, 2, 3), torch.zeros(2, 4))
    assert reason is not None and "backend='torch'" in reason


def test_triton_layer_uses_the_triton_conv_by_default(monkeypatch):
    """The unfused triton layer runs our causal conv unless $NNUNETV2_MAMBA_TRITON_CONV=0 asks for torch's."""
    from nnunetv2_mamba.ssm import get_backend
    from nnunetv2_mamba.ssm.backends.triton_conv import causal_conv1d_silu

    monkeypatch.delenv("NNUNETV2_MAMBA_TRITON_CONV", raising=False)
    assert get_backend("triton").causal_conv1d() is causal_conv1d_silu
    monkeypatch.setenv("NNUNETV2_MAMBA_TRITON_CONV", "0")
    assert get_backend("triton").causal_conv1d() is None
