"""The shared SSM core (nnunetv2_mamba.layers.ssm): Delta init, A_log/D, the scan branch, and old checkpoints.

``fixtures/mixers_before_ssm_core.pt`` was written by the code before the mixers shared this core (commit
3e8c116): for every mixer form, the state_dict of a fresh module built under ``torch.manual_seed(0)``, an input
and the module's eval output. Built with the same arguments, the modules of today must draw the same initial
parameters (same random-number order), load those state_dicts strictly and give the same outputs.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_mamba.layers import (Mamba, init_dt_projection_, selective_scan_branch, ssm_state_parameters,
                                   state_matrix)
from nnunetv2_mamba.network_architectures.logvmamba_mixers import (GlobalTokenMixer, LocalGlobalTokenMixer,
                                                                   LocalTokenMixer, VanillaScanMixer)
from nnunetv2_mamba.network_architectures.vivim import STMambaV3
from tests.nnunetv2_mamba.ssm.test_scan import reference_scan

FIXTURE = Path(__file__).parent / "fixtures" / "mixers_before_ssm_core.pt"

# name -> (constructor, extra forward arguments); the arguments the fixture was written with.
MIXERS = {
    "mamba": (lambda: Mamba(8, d_state=4, backend="torch"), ()),
    "mamba_constant_dt": (lambda: Mamba(8, d_state=4, d_conv=3, expand=1, dt_rank=3, dt_init="constant",
                                        bias=True, backend="torch"), ()),
    "vanilla_3d": (lambda: VanillaScanMixer(8, (2, 3, 4), d_state=4, backend="torch"), ()),
    "local_3d": (lambda: LocalTokenMixer(16, (2, 2, 3), d_state=4, backend="torch"), ()),
    "global_3d": (lambda: GlobalTokenMixer(8, (4, 4, 4), squeeze=2, grid_stride=(2, 2, 2), d_state=4,
                                           backend="torch"), ()),
    "local_global_3d": (lambda: LocalGlobalTokenMixer(16, (4, 2, 2), grid_stride=(2, 1, 1), d_state=4,
                                                      backend="torch"), ()),
    "local_global_2d": (lambda: LocalGlobalTokenMixer(8, (4, 4), grid_stride=(2, 2), d_state=4, backend="torch"),
                        ()),
    "st_mamba_v3": (lambda: STMambaV3(8, d_state=4, backend="torch"), (3,)),
}


@pytest.fixture(scope="module")
def saved():
    return torch.load(FIXTURE, weights_only=True)


def test_fixture_covers_every_mixer(saved):
    assert sorted(saved) == sorted(MIXERS)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_fresh_init_under_seed_0_equals_the_old_code(saved, name):
    torch.manual_seed(0)
    state = MIXERS[name][0]().state_dict()
    assert list(state) == list(saved[name]["state_dict"])
    for key, value in saved[name]["state_dict"].items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_old_state_dict_loads_strictly_and_gives_the_old_output(saved, name):
    build, extra = MIXERS[name]
    torch.manual_seed(123)  # other weights than the saved ones, so that loading has to change the output
    module = build().eval()
    x, expected = saved[name]["input"], saved[name]["output"]
    with torch.no_grad():
        assert not torch.allclose(module(x, *extra), expected)
        module.load_state_dict(saved[name]["state_dict"], strict=True)
        torch.testing.assert_close(module(x, *extra), expected)


def test_dt_projection_draws_weight_then_dt_and_inverts_the_softplus():
    weight, bias = torch.empty(12, 3), torch.empty(12)
    torch.manual_seed(0)
    init_dt_projection_(weight, bias, dt_min=0.01, dt_max=0.2)
    torch.manual_seed(0)
    expected_weight = torch.empty(12, 3).uniform_(-3 ** -0.5, 3 ** -0.5)
    expected_dt = torch.exp(torch.rand(12) * (math.log(0.2) - math.log(0.01)) + math.log(0.01))
    assert torch.equal(weight, expected_weight)
    torch.testing.assert_close(F.softplus(bias), expected_dt, rtol=1e-5, atol=0)
    assert bias._no_reinit and not hasattr(weight, "_no_reinit")


def test_dt_projection_constant_init_clamp_and_leading_axis():
    weight, bias = torch.empty(1, 5, 4), torch.empty(1, 5)  # VMamba's layout with K = 1 direction
    init_dt_projection_(weight, bias, dt_init="constant", dt_scale=2.0, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    assert torch.equal(weight, torch.full((1, 5, 4), 2.0 * 4 ** -0.5))
    torch.testing.assert_close(F.softplus(bias), torch.full((1, 5), 1e-3))  # every dt was below the floor


def test_dt_projection_same_numbers_with_and_without_leading_axis():
    torch.manual_seed(3)
    flat_weight, flat_bias = torch.empty(6, 2), torch.empty(6)
    init_dt_projection_(flat_weight, flat_bias)
    torch.manual_seed(3)
    weight, bias = torch.empty(1, 6, 2), torch.empty(1, 6)
    init_dt_projection_(weight, bias)
    assert torch.equal(weight[0], flat_weight) and torch.equal(bias[0], flat_bias)


def test_dt_projection_rejects_unknown_init():
    with pytest.raises(ValueError, match="dt_init must be 'random' or 'constant'; got 'normal'"):
        init_dt_projection_(torch.empty(4, 2), torch.empty(4), dt_init="normal")


def test_state_parameters_are_s4d_real_and_draw_no_random_numbers():
    rng_state = torch.get_rng_state()
    a_log, skip = ssm_state_parameters(3, 5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.testing.assert_close(state_matrix(a_log), -torch.arange(1.0, 6.0).repeat(3, 1))
    assert torch.equal(skip, torch.ones(3))
    assert a_log.requires_grad and skip.requires_grad
    assert a_log._no_weight_decay and skip._no_weight_decay


def test_state_matrix_is_fp32_for_low_precision_logs():
    a = state_matrix(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert a.dtype == torch.float32 and torch.equal(a, -torch.ones(2, 3))


@pytest.mark.parametrize("gated", [True, False])
def test_scan_branch_equals_the_written_out_selective_scan(gated):
    torch.manual_seed(0)
    batch, channels, length, d_state, dt_rank = 2, 6, 7, 4, 3
    x = torch.randn(batch, channels, length, dtype=torch.float64)
    z = torch.randn(batch, channels, length, dtype=torch.float64) if gated else None
    x_proj = torch.randn(dt_rank + 2 * d_state, channels, dtype=torch.float64) * 0.5
    dt_weight = torch.randn(channels, dt_rank, dtype=torch.float64)
    # D and the Delta bias enter the scan in fp32 (mamba_ssm's convention): make them fp32 numbers.
    dt_bias, skip = torch.randn(channels).double(), torch.randn(channels).double()
    a_log = torch.rand(channels, d_state, dtype=torch.float64)
    a = -torch.exp(a_log)
    y = selective_scan_branch(x, a, x_proj, dt_weight, dt_bias, skip, z=z, backend="torch")
    projected = torch.einsum("cd,bdl->bcl", x_proj, x)  # per token: (dt_low_rank, B, C)
    low_rank, b, c = projected[:, :dt_rank], projected[:, dt_rank:dt_rank + d_state], projected[:, dt_rank + d_state:]
    delta = torch.einsum("dr,brl->bdl", dt_weight, low_rank)
    expected, _ = reference_scan(x, delta, a, b, c, skip, z, dt_bias, delta_softplus=True)
    assert y.shape == (batch, channels, length)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
