"""Epoch-indexed learning-rate schedules in closed form, stepped like nnU-Net's PolyLRScheduler.

nnU-Net calls ``lr_scheduler.step(current_epoch)`` at the start of every epoch and does not save scheduler
state in its checkpoints, so a schedule must be a pure function of the epoch: resuming at epoch e then gives
exactly the learning rate of an uninterrupted run. PyTorch's own schedulers deprecate ``step(epoch)`` and
are recursive; these classes compute the value from the formula instead.

- ``CosineAnnealingEpochLR``: ``lr(e) = min_lr + (max_lr - min_lr) * (1 + cos(pi * e / T)) / 2`` with
  ``T = num_epochs`` (one decay over the run). ``t_max=100`` reproduces the Taming-Mambas reference, whose
  hard-coded T_max=100 makes the rate oscillate with a period of 200 epochs over 1000/300 epochs.
- ``OneCycleEpochLR``: PyTorch's OneCycleLR (two phases, cosine annealing) as a function of the epoch,
  including the inverse cycling of the momentum (Adam-family ``betas[0]``, else ``momentum``).
- ``StepDecayEpochLR``: ``lr(e) = initial_lr * gamma`` from the milestone epoch on, else ``initial_lr``
  (LoG-VMamba's paper recipe; torch's MultiStepLR is recursive and deprecates ``step(epoch)``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def cosine_annealing(start: float, end: float, fraction: float) -> float:
    """Return the cosine interpolation from start (fraction 0) to end (fraction 1)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


def cosine_lr(epoch: int, max_lr: float, min_lr: float, t_max: int) -> float:
    """Return the closed-form cosine-annealing rate at ``epoch`` (periodic in 2*t_max beyond t_max)."""
    return cosine_annealing(max_lr, min_lr, epoch / t_max)


def one_cycle_values(step: int, total_steps: int, max_lr: float, pct_start: float = 0.1,
                     div_factor: float = 25.0, final_div_factor: float = 1e8, base_momentum: float = 0.85,
                     max_momentum: float = 0.95) -> Tuple[float, float]:
    """Return (learning rate, momentum) of PyTorch's two-phase cosine OneCycleLR at ``step``.

    Phase 1 (steps 0 .. pct_start*total_steps - 1): lr max_lr/div_factor -> max_lr, momentum max -> base.
    Phase 2 (.. total_steps - 1): lr max_lr -> initial_lr/final_div_factor, momentum base -> max.
    Steps beyond the last keep the final values.
    """
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warmup_end = float(pct_start * total_steps) - 1  # PyTorch's phase boundary (may be fractional)
    last_step = float(total_steps - 1)
    if step <= warmup_end:
        fraction = step / warmup_end if warmup_end > 0 else 1.0
        return (cosine_annealing(initial_lr, max_lr, fraction),
                cosine_annealing(max_momentum, base_momentum, fraction))
    span = last_step - warmup_end
    fraction = min((step - warmup_end) / span, 1.0) if span > 0 else 1.0
    return cosine_annealing(max_lr, min_lr, fraction), cosine_annealing(base_momentum, max_momentum, fraction)


class EpochLRScheduler(LRScheduler):
    """Base of closed-form schedules: ``step(epoch)`` sets every group's lr to ``lr_at(epoch)``.

    ``step()`` without an epoch uses an internal counter (0, 1, 2, ...), like nnU-Net's PolyLRScheduler.
    """

    def __init__(self, optimizer: Optimizer, current_epoch: Optional[int] = None):
        self._next_epoch = 0
        super().__init__(optimizer, -1)  # runs step() once: epoch 0
        if current_epoch is not None:
            self.step(current_epoch)

    def lr_at(self, epoch: int) -> float:
        """Return the learning rate of ``epoch``."""
        raise NotImplementedError

    def _apply_extra(self, epoch: int) -> None:
        """Set values other than the learning rate (e.g. momentum) for ``epoch``."""

    def get_lr(self):
        """Return the learning rates of the current epoch (one per parameter group)."""
        return [self.lr_at(max(self.last_epoch, 0)) for _ in self.optimizer.param_groups]

    def step(self, epoch: Optional[int] = None) -> None:
        """Set the optimizer's learning rate (and extras) to the values of ``epoch``."""
        if epoch is None or epoch == -1:
            epoch = self._next_epoch
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"{type(self).__name__}.step: epoch must be >= 0; got {epoch}.")
        self._next_epoch = epoch + 1
        self.last_epoch = epoch
        learning_rate = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self._apply_extra(epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class CosineAnnealingEpochLR(EpochLRScheduler):
    """Cosine decay from max_lr at epoch 0 to min_lr at ``t_max`` (default: num_epochs, a single decay).

    ``t_max`` smaller than the run (the Taming reference: 100 for 1000/300 epochs) gives the periodic
    schedule of PyTorch's CosineAnnealingLR stepped with an epoch: down to min_lr at t_max, back up at 2*t_max.
    """

    def __init__(self, optimizer: Optimizer, max_lr: float, num_epochs: int, min_lr: float = 5e-6,
                 t_max: Optional[int] = None, current_epoch: Optional[int] = None):
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.num_epochs = int(num_epochs)
        self.t_max = self.num_epochs if t_max is None else int(t_max)
        if self.t_max < 1:
            raise ValueError(f"CosineAnnealingEpochLR: t_max (or num_epochs) must be >= 1; got {self.t_max}.")
        super().__init__(optimizer, current_epoch)

    def lr_at(self, epoch: int) -> float:
        """Return the cosine rate of ``epoch``."""
        return cosine_lr(epoch, self.max_lr, self.min_lr, self.t_max)


class StepDecayEpochLR(EpochLRScheduler):
    """One step decay: ``initial_lr`` before epoch ``milestone``, ``initial_lr * gamma`` from it on."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, milestone: int, gamma: float = 0.1,
                 current_epoch: Optional[int] = None):
        self.initial_lr, self.milestone, self.gamma = float(initial_lr), int(milestone), float(gamma)
        super().__init__(optimizer, current_epoch)

    def lr_at(self, epoch: int) -> float:
        """Return the step-decayed rate of ``epoch``."""
        return self.initial_lr * (self.gamma if epoch >= self.milestone else 1.0)


class OneCycleEpochLR(EpochLRScheduler):
    """PyTorch's OneCycleLR (cosine, two phases) indexed by epoch, with ``total_epochs`` steps.

    With ``cycle_momentum`` the momentum cycles inversely to the rate: ``betas[0]`` for Adam-family optimizers
    (RAdam, Adam, AdamW), else the SGD ``momentum``.
    """

    def __init__(self, optimizer: Optimizer, max_lr: float, total_epochs: int, pct_start: float = 0.1,
                 div_factor: float = 25.0, final_div_factor: float = 1e8, cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95, current_epoch: Optional[int] = None):
        if int(total_epochs) < 1:
            raise ValueError(f"OneCycleEpochLR: total_epochs must be >= 1; got {total_epochs}.")
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"OneCycleEpochLR: pct_start must be in [0, 1]; got {pct_start}.")
        self.max_lr = float(max_lr)
        self.total_epochs = int(total_epochs)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.cycle_momentum = bool(cycle_momentum)
        self.base_momentum = float(base_momentum)
        self.max_momentum = float(max_momentum)
        if self.cycle_momentum:
            defaults = optimizer.defaults
            if "betas" in defaults:
                self._momentum_key = "betas"
            elif "momentum" in defaults:
                self._momentum_key = "momentum"
            else:
                raise ValueError(f"OneCycleEpochLR: cycle_momentum=True needs an optimizer with 'betas' or "
                                 f"'momentum'; {type(optimizer).__name__} has neither. Pass cycle_momentum=False.")
        super().__init__(optimizer, current_epoch)

    def values_at(self, epoch: int) -> Tuple[float, float]:
        """Return (learning rate, momentum) of ``epoch``."""
        return one_cycle_values(epoch, self.total_epochs, self.max_lr, self.pct_start, self.div_factor,
                                self.final_div_factor, self.base_momentum, self.max_momentum)

    def lr_at(self, epoch: int) -> float:
        """Return the one-cycle rate of ``epoch``."""
        return self.values_at(epoch)[0]

    def _apply_extra(self, epoch: int) -> None:
        if not self.cycle_momentum:
            return
        momentum = self.values_at(epoch)[1]
        for group in self.optimizer.param_groups:
            if self._momentum_key == "betas":
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum
