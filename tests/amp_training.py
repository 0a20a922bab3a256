"""Shared check for real nnU-Net training steps under fp16 AMP (used by the GPU test modules).

nnU-Net's GradScaler starts at 2**16. At initialisation the faithful networks produce large logits (the
residual 1x1 shortcuts and additive skips of U-Mamba and LoG-VMamba grow the activations; LoG-VMamba's first
loss is about 50 on the GPU test plans), so the first few scaled backward passes overflow fp16 and the scaler
skips them, halving its scale each time. That is the scaler working, not a defect. A defect is a non-finite
gradient that does not depend on the scale (a NaN in a mixer): then no step is ever applied. So the check
runs steps until several were applied, and bounds the number of steps it allows.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import torch


def train_until_steps_are_applied(trainer, make_batch: Callable, needed: int = 3,
                                  max_steps: int = 24) -> List[Tuple[float, float, bool]]:
    """Run ``trainer.train_step`` until ``needed`` optimizer steps were applied; return (loss, scale, applied).

    A step counts as skipped when the GradScaler's scale dropped during it. Every loss must be finite, and
    every applied step must leave finite gradients. Fails when ``max_steps`` pass with fewer applied steps,
    which is what a scale-independent NaN/inf gives (the scale falls below 1e-2 after 24 skips).
    """
    scaler = trainer.grad_scaler
    history: List[Tuple[float, float, bool]] = []
    applied = 0
    for step in range(max_steps):
        scale_before = scaler.get_scale() if scaler is not None else 1.0
        result = trainer.train_step(make_batch(trainer, seed=step))
        loss = float(result["loss"])
        assert np.isfinite(loss), f"step {step}: loss {loss}; history {history}"
        skipped = scaler is not None and scaler.get_scale() < scale_before
        history.append((round(loss, 4), scale_before, not skipped))
        if skipped:
            continue
        applied += 1
        for name, parameter in trainer.network.named_parameters():
            if parameter.grad is not None:
                assert torch.isfinite(parameter.grad).all(), f"step {step}: non-finite gradient in {name}"
        if applied >= needed:
            break
    assert applied >= needed, (f"only {applied} of {len(history)} steps were applied: the GradScaler kept "
                               f"skipping, so a gradient is non-finite at every scale. (loss, scale, applied): "
                               f"{history}")
    return history


def check_real_training_steps(trainer, make_batch: Callable, mixer_marker: str) -> None:
    """Train ``trainer`` until steps are applied, then check that it learned and still validates.

    After ``train_until_steps_are_applied``: every parameter is finite, some parameter whose name contains
    ``mixer_marker`` (the family's Mamba mixer, e.g. ".mamba.") changed, and a validation step gives a finite
    loss.
    """
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    trainer.network.train()
    train_until_steps_are_applied(trainer, make_batch)
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    changed = [name for name, p in trainer.network.named_parameters() if not torch.equal(p, before[name])]
    assert any(mixer_marker in name for name in changed), f"no {mixer_marker!r} parameter changed"
    trainer.network.eval()
    assert np.isfinite(trainer.validation_step(make_batch(trainer, seed=9))["loss"])
