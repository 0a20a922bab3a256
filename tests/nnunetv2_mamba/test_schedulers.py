"""Epoch-indexed closed-form schedules: values from the formulas, PyTorch equivalence, resumption."""
import math

import pytest
import torch

from nnunetv2_mamba.schedulers import CosineAnnealingEpochLR, OneCycleEpochLR, StepDecayEpochLR


def _optimizer(kind="radam", lr=3e-4):
    params = [torch.nn.Parameter(torch.zeros(2))]
    if kind == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=3e-5)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _lr(optimizer):
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("epoch", [0, 1, 250, 500, 750, 999])
def test_cosine_single_decay_over_the_run(epoch):
    optimizer = _optimizer()
    scheduler = CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=1000, min_lr=5e-6)
    scheduler.step(epoch)
    expected = 5e-6 + (3e-4 - 5e-6) * (1 + math.cos(math.pi * epoch / 1000)) / 2
    assert _lr(optimizer) == pytest.approx(expected, rel=1e-12)
    assert scheduler.get_last_lr() == [pytest.approx(expected, rel=1e-12)]


def test_cosine_is_monotonic_without_period_and_hits_bounds():
    optimizer = _optimizer()
    scheduler = CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=300)
    values = []
    for epoch in range(300):
        scheduler.step(epoch)
        values.append(_lr(optimizer))
    assert values[0] == pytest.approx(3e-4)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 5e-6 and values[-1] < 5e-6 + 1e-8  # one epoch before the minimum
    assert values[150] == pytest.approx((3e-4 + 5e-6) / 2)


def test_cosine_reference_period_200_epochs():
    optimizer = _optimizer()
    scheduler = CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=1000, min_lr=5e-6, t_max=100)
    values = {}
    for epoch in (0, 50, 100, 150, 200, 300, 999):
        scheduler.step(epoch)
        values[epoch] = _lr(optimizer)
    assert values[100] == pytest.approx(5e-6) and values[300] == pytest.approx(5e-6)
    assert values[200] == pytest.approx(3e-4) and values[0] == pytest.approx(3e-4)
    assert values[150] == pytest.approx(values[50])
    expected_999 = 5e-6 + (3e-4 - 5e-6) * (1 + math.cos(math.pi * 999 / 100)) / 2
    assert values[999] == pytest.approx(expected_999)


def test_cosine_reference_equals_pytorch_cosine_annealing_stepped_per_epoch():
    # The reference's schedule: torch CosineAnnealingLR(T_max=100, eta_min=5e-6), stepped once per epoch.
    reference_optimizer, optimizer = _optimizer(), _optimizer()
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=100, eta_min=5e-6)
    scheduler = CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=300, t_max=100)
    for epoch in range(300):
        scheduler.step(epoch)
        assert _lr(optimizer) == pytest.approx(_lr(reference_optimizer), rel=1e-6, abs=1e-12), epoch
        reference_optimizer.step()
        reference.step()


def test_one_cycle_values_from_the_formula():
    optimizer = _optimizer()
    scheduler = OneCycleEpochLR(optimizer, 3e-4, total_epochs=300)
    start, final = 3e-4 / 25, 3e-4 / 25 / 1e8
    warmup_end = 0.1 * 300 - 1

    def anneal(a, b, fraction):
        return b + (a - b) * (1 + math.cos(math.pi * fraction)) / 2

    for epoch in (0, 10, 29, 30, 150, 299):
        scheduler.step(epoch)
        if epoch <= warmup_end:
            fraction = epoch / warmup_end
            lr, beta1 = anneal(start, 3e-4, fraction), anneal(0.95, 0.85, fraction)
        else:
            fraction = (epoch - warmup_end) / (299 - warmup_end)
            lr, beta1 = anneal(3e-4, final, fraction), anneal(0.85, 0.95, fraction)
        assert _lr(optimizer) == pytest.approx(lr, rel=1e-9), epoch
        assert optimizer.param_groups[0]["betas"][0] == pytest.approx(beta1, rel=1e-9), epoch
        assert optimizer.param_groups[0]["betas"][1] == 0.999  # beta2 untouched
    scheduler.step(0)
    assert _lr(optimizer) == pytest.approx(1.2e-5)
    assert optimizer.param_groups[0]["betas"][0] == pytest.approx(0.95)
    scheduler.step(299)
    assert _lr(optimizer) == pytest.approx(1.2e-13)


@pytest.mark.parametrize("kind,total", [("radam", 300), ("sgd", 37)])
def test_one_cycle_equals_pytorch_one_cycle_stepped_per_epoch(kind, total):
    reference_optimizer, optimizer = _optimizer(kind), _optimizer(kind)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=3e-4, total_steps=total,
                                                    pct_start=0.1, anneal_strategy="cos", div_factor=25,
                                                    final_div_factor=1e8)
    scheduler = OneCycleEpochLR(optimizer, 3e-4, total_epochs=total)
    key = "betas" if kind == "radam" else "momentum"
    for epoch in range(total):
        scheduler.step(epoch)
        assert _lr(optimizer) == pytest.approx(_lr(reference_optimizer), rel=1e-9), epoch
        ours, theirs = optimizer.param_groups[0][key], reference_optimizer.param_groups[0][key]
        assert (ours[0] if kind == "radam" else ours) == pytest.approx(theirs[0] if kind == "radam" else theirs)
        reference_optimizer.step()
        reference.step()


def test_step_without_epoch_counts_and_resumption_is_exact():
    counted_optimizer, resumed_optimizer = _optimizer(), _optimizer()
    counted = OneCycleEpochLR(counted_optimizer, 3e-4, total_epochs=50)
    for _ in range(17):
        counted.step()
    # Constructed at epoch 0 (like every torch scheduler), then 17 counted steps: epoch 17.
    resumed = OneCycleEpochLR(resumed_optimizer, 3e-4, total_epochs=50, current_epoch=17)
    assert _lr(counted_optimizer) == _lr(resumed_optimizer)
    assert counted_optimizer.param_groups[0]["betas"] == resumed_optimizer.param_groups[0]["betas"]
    # nnU-Net style: step(current_epoch) may jump (continue training); the value depends only on the epoch.
    counted.step(40)
    resumed.step(3)
    resumed.step(40)
    assert _lr(counted_optimizer) == _lr(resumed_optimizer)


def test_schedules_survive_tiny_runs_and_reject_bad_arguments():
    optimizer = _optimizer()
    OneCycleEpochLR(optimizer, 3e-4, total_epochs=1)  # the e2e tests train 1 epoch
    assert math.isfinite(_lr(optimizer))
    OneCycleEpochLR(optimizer, 3e-4, total_epochs=10)  # phase boundary at step 0
    assert _lr(optimizer) == pytest.approx(3e-4)
    CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=1)
    assert _lr(optimizer) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="t_max"):
        CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=0)
    with pytest.raises(ValueError, match="total_epochs"):
        OneCycleEpochLR(optimizer, 3e-4, total_epochs=0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        CosineAnnealingEpochLR(optimizer, 3e-4, num_epochs=10).step(-3)
    adagrad = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        OneCycleEpochLR(adagrad, 1e-3, total_epochs=10)


def test_step_decay_schedule_is_a_function_of_the_epoch():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-4)
    scheduler = StepDecayEpochLR(optimizer, 1e-4, milestone=140, gamma=0.1)
    rates = {}
    for epoch in (0, 139, 140, 199, 5):  # resuming / stepping out of order gives the same value
        scheduler.step(epoch)
        rates[epoch] = optimizer.param_groups[0]["lr"]
    assert rates[0] == rates[139] == rates[5] == pytest.approx(1e-4)
    assert rates[140] == rates[199] == pytest.approx(1e-5)
    assert scheduler.get_last_lr() == [pytest.approx(1e-4)]
    resumed = StepDecayEpochLR(torch.optim.Adam([parameter], lr=1e-4), 1e-4, milestone=140, current_epoch=150)
    assert resumed.get_last_lr() == [pytest.approx(1e-5)]
