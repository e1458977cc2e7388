"""The optimizer update: clipping really clips, non-finite updates are skipped without touching weights."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from cycletune.train.update import optimizer_update


def _model_with_grads(scale: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    loss = (model(torch.randn(16, 8)) * scale).pow(2).mean()
    loss.backward()
    return model


def _step(
    max_grad_norm: float | None, *, nonfinite: bool = False, scale: float = 1.0
) -> tuple[torch.Tensor, bool]:
    """Parameter change of one AdamW step from a fixed start, and whether the step was skipped."""
    model = _model_with_grads(scale)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = optimizer_update(Accelerator(cpu=True), optimizer, scheduler, max_grad_norm, nonfinite)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert all(p.grad is None for p in model.parameters()), "gradients must be cleared after the update"
    return after - before, result.skipped


def test_clipping_changes_the_update() -> None:
    # Adam normalises gradient scale, so clip to far below eps: a skipped clip would move weights by ~lr.
    unclipped, _ = _step(max_grad_norm=None)
    clipped, _ = _step(max_grad_norm=1e-10)
    assert unclipped.abs().max() > 0.05
    assert clipped.abs().max() < 0.02 * unclipped.abs().max()


def test_gradients_are_clipped_to_the_norm() -> None:
    model = _model_with_grads(scale=100.0)
    accelerator = Accelerator(cpu=True)
    norm_before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        )
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = optimizer_update(accelerator, optimizer, scheduler, 0.5, nonfinite_loss=False)
    assert norm_before > 1.0
    assert abs(result.grad_norm - float(norm_before)) < 1e-3 * float(norm_before)
    assert abs(float(seen[0]) - 0.5) < 1e-4


def test_nonfinite_loss_or_gradient_skips_the_step() -> None:
    change, skipped = _step(max_grad_norm=1.0, nonfinite=True)
    assert skipped and change.abs().max() == 0
    change, skipped = _step(max_grad_norm=1.0, scale=float("inf"))
    assert skipped and change.abs().max() == 0
    change, skipped = _step(max_grad_norm=1.0)
    assert not skipped and change.abs().max() > 0
