"""The Mamba layer: mamba_ssm-compatible parameters and initialisation, the math, state_dict round trips."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_mamba.layers import Mamba
from tests.nnunetv2_mamba.ssm.test_scan import reference_scan


def expected_shapes(d_model, d_state=16, d_conv=4, expand=2):
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state), "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv), "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank), "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("d_model,d_state,d_conv,expand", [(32, 16, 4, 2), (20, 8, 3, 1), (320, 64, 4, 2)])
def test_state_dict_names_and_shapes_equal_mamba_ssm(d_model, d_state, d_conv, expand):
    layer = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == expected_shapes(d_model, d_state, d_conv, expand)


def test_initialisation_follows_mamba():
    torch.manual_seed(0)
    layer = Mamba(64, d_state=16, dt_min=0.001, dt_max=0.1)
    torch.testing.assert_close(layer.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert torch.equal(layer.D, torch.ones(128))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    bound = layer.dt_rank ** -0.5
    assert layer.dt_proj.weight.abs().max() <= bound
    assert layer.dt_proj.weight.abs().max() > bound * 0.5  # uniform, not constant or zero
    assert layer.in_proj.bias is None and layer.out_proj.bias is None and layer.x_proj.bias is None
    assert getattr(layer.A_log, "_no_weight_decay", False) and getattr(layer.D, "_no_weight_decay", False)


def reference_layer(layer, tokens):
    """The Mamba layer written out step by step from its definition (float64)."""
    p = {name: t.detach().double() for name, t in layer.state_dict().items()}
    h = tokens.double()
    length = h.shape[1]
    xz = h @ p["in_proj.weight"].T
    x, z = xz.chunk(2, dim=-1)
    x = x.transpose(1, 2)
    kernel = p["conv1d.weight"]  # (d_inner, 1, k): causal conv = left pad k - 1
    x = F.conv1d(F.pad(x, (layer.d_conv - 1, 0)), kernel, p["conv1d.bias"], groups=layer.d_inner)
    u = F.silu(x)
    x_dbl = u.transpose(1, 2) @ p["x_proj.weight"].T
    dt, B, C = torch.split(x_dbl, [layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    delta = (dt @ p["dt_proj.weight"].T).transpose(1, 2)
    y, _ = reference_scan(u, delta, -torch.exp(p["A_log"]), B.transpose(1, 2), C.transpose(1, 2), p["D"],
                          z.transpose(1, 2), p["dt_proj.bias"], delta_softplus=True)
    assert y.shape[-1] == length
    return y.transpose(1, 2) @ p["out_proj.weight"].T


def test_forward_matches_written_out_math():
    torch.manual_seed(1)
    layer = Mamba(12, d_state=5).double()
    tokens = torch.randn(2, 23, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(tokens), reference_layer(layer, tokens), rtol=1e-9, atol=1e-9)


def test_layer_is_causal():
    torch.manual_seed(2)
    layer = Mamba(8)
    tokens = torch.randn(1, 30, 8)
    changed = tokens.clone()
    changed[:, 20:] += 5.0
    out, out_changed = layer(tokens), layer(changed)
    torch.testing.assert_close(out[:, :20], out_changed[:, :20])
    assert not torch.allclose(out[:, 20:], out_changed[:, 20:])


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(3)
    source = Mamba(16, d_state=8)
    target = Mamba(16, d_state=8)
    tokens = torch.randn(2, 17, 16)
    assert not torch.allclose(source(tokens), target(tokens))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(source(tokens), target(tokens), rtol=0, atol=0)


def test_backward_reaches_every_parameter():
    layer = Mamba(8, d_state=4)
    layer(torch.randn(2, 11, 8)).square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_numpy_int_d_model_is_normalised():
    import numpy as np

    layer = Mamba(np.int64(24))
    assert isinstance(layer.d_model, int) and layer.d_inner == 48


def test_bad_token_shape_is_explained():
    with pytest.raises(ValueError, match=r"expects tokens \(batch, length, 8\)"):
        Mamba(8)(torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_run_in_fp32_disables_autocast_and_casts_up(dtype):
    from nnunetv2_mamba.layers import run_in_fp32

    seen = {}

    def probe(x):
        seen["dtype"] = x.dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return x @ x.transpose(-1, -2)  # would run in bf16 under CPU autocast

    x = torch.randn(3, 4).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_in_fp32(probe, x)
    assert seen == {"dtype": torch.float32, "autocast": False}
    assert out.dtype == torch.float32
