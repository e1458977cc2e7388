"""The logging window: a log every train.logging_steps steps shows each model's mean terms since the last."""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import Accelerator

from cycletune.train.tracking import LoggingWindow, trackers_for


def test_window_means_each_models_terms_over_its_own_updates_and_keeps_the_last_lr() -> None:
    window = LoggingWindow()
    window.add("captioner", {"caption_ce": torch.tensor(1.0)}, samples=2, seconds=0.5, lr=0.1, grad_norm=5.0)
    window.add("generator", {"denoise": torch.tensor(4.0)}, samples=2, seconds=0.5, lr=0.2, grad_norm=6.0)
    window.add("captioner", {"caption_ce": torch.tensor(3.0)}, samples=2, seconds=1.0, lr=0.3, grad_norm=7.0)
    logs = window.summary()
    assert logs["captioner/caption_ce"] == pytest.approx(2.0)
    assert logs["generator/denoise"] == pytest.approx(4.0)
    assert (logs["captioner/lr"], logs["captioner/grad_norm"]) == (0.3, 7.0)
    assert logs["samples_per_second"] == pytest.approx(6 / 2.0)  # the steps' own seconds only


def test_window_keeps_tensors_on_their_device_until_the_summary() -> None:
    """No host sync per update: the sums stay tensors until summary() reads them."""
    window = LoggingWindow()
    window.add(
        "generator",
        {"denoise": torch.tensor(1.0), "weight": 0.5},
        samples=1,
        seconds=1.0,
        lr=0.1,
        grad_norm=1.0,
    )
    window.add(
        "generator",
        {"denoise": torch.tensor(2.0), "weight": 0.5},
        samples=1,
        seconds=1.0,
        lr=0.1,
        grad_norm=1.0,
    )
    assert torch.is_tensor(window.sums["generator"]["denoise"])
    assert window.summary()["generator/weight"] == pytest.approx(0.5)


def test_report_to_none_starts_no_tracker_and_warns_nothing() -> None:
    """Accelerate warns about `log_with=[]` ("no supported trackers are installed"): none must pass None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerator = Accelerator(log_with=trackers_for("none"))
    assert not [str(w.message) for w in caught if "log_with" in str(w.message)]
    assert accelerator.log_with == []
