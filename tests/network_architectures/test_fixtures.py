"""Every shipped network still initialises, computes and loads exactly as before issue 10's refactoring.

``fixtures/networks_before_issue10.pt`` was written by ``make_fixtures.py`` from the code before the change.
Each network is built through its trainer's public ``build_network_architecture`` (what nnU-Net's training and
predictor call) under the same seed, with the torch scan backend, fp32, CPU, eval mode, and compared with it:
(a) the same state_dict keys, shapes and values (pins the initialisation), (b) the same outputs on the saved
input (deep-supervision outputs included), (c) the saved state_dict loads strictly (old checkpoints load).
"""
import pytest
import torch

from nnunetv2_mamba.ssm import BACKEND_ENV_VAR
from tests.network_architectures import make_fixtures
from tests.network_architectures.make_fixtures import (FIXTURE_PATH, NETWORKS, VIVIM_NETWORKS, parameter_count,
                                                       run, summary, unpack_state)

#: Tight fp32 tolerances: the same arithmetic gives the same values (a little room for other CPUs' kernels).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fixtures():
    return torch.load(FIXTURE_PATH, weights_only=True)


@pytest.fixture(autouse=True)
def torch_scan_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")


def build_vivim(name: str) -> torch.nn.Module:
    """Return the stored (tiny) Vivim built from the plan its trainer trains with.

    Vivim's plans are being reworked by another developer (issue 10): when the trainer path changes, adapt this
    helper (and make_fixtures.vivim_configuration_manager) so that it builds the same tiny network through the
    new path; the stored values must not change.
    """
    return make_fixtures.build_vivim_like_trainer(name)


def build(name: str) -> torch.nn.Module:
    """Return network ``name`` built as training builds it, under the fixture's seed."""
    return build_vivim(name) if name in VIVIM_NETWORKS else make_fixtures.build_network(name)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_initialisation_is_unchanged(name, fixtures):
    saved = unpack_state(fixtures[name]["state_dict"])
    state = build(name).state_dict()
    assert list(state) == list(saved)
    for key, value in state.items():
        assert value.shape == saved[key].shape and value.dtype == saved[key].dtype, key
        assert torch.equal(value, saved[key]), f"{name}: {key} is initialised differently"


@pytest.mark.parametrize("name", list(NETWORKS))
def test_outputs_and_parameter_count_are_unchanged(name, fixtures):
    network = build(name)
    assert parameter_count(network) == fixtures[name]["parameter_count"]
    outputs = run(network, fixtures[name]["input"])
    assert len(outputs) == len(fixtures[name]["outputs"])
    for output, expected in zip(outputs, fixtures[name]["outputs"]):
        torch.testing.assert_close(output, expected, **TOLERANCE)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_saved_state_dict_loads_strictly(name, fixtures):
    network = build(name)
    with torch.no_grad():  # overwrite the fresh values: the outputs below then come from the loaded state alone
        for value in network.state_dict().values():
            if value.is_floating_point():
                value.fill_(0.5)
    network.load_state_dict(unpack_state(fixtures[name]["state_dict"]), strict=True)
    for output, expected in zip(run(network, fixtures[name]["input"]), fixtures[name]["outputs"]):
        torch.testing.assert_close(output, expected, **TOLERANCE)


@pytest.mark.parametrize("name", VIVIM_NETWORKS)
def test_full_size_vivim_is_unchanged(name, fixtures):
    saved = fixtures[f"{name}_full_size"]
    current = summary(make_fixtures.build_full_size_vivim(name))
    assert current["parameter_count"] == saved["parameter_count"]
    assert current["n_keys"] == saved["n_keys"] and current["layout_sha256"] == saved["layout_sha256"]
    assert torch.equal(current["sums"], saved["sums"])
