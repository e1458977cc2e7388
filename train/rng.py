"""Every global random generator's state as plain tensors, so a checkpoint can carry it in safetensors.

Why: most of training draws from per-sample keys (models/randomness.py), but dropout (LoRA dropout
included) draws from torch's global generator. A resumed run must continue that generator exactly, and
pickled RNG states (what `accelerator.save_state` writes) would let a planted file run code on load.
Each rank saves its own state; python's and numpy's generators travel too, for any library that uses them.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

# random.getstate()[0]: the Mersenne Twister state layout python has used since 3.2.
_PYTHON_STATE_VERSION = 3


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """torch (CPU and every CUDA device), numpy and python generator states, each as a CPU tensor."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, device_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{index}"] = device_state
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    state["numpy_position_has_gauss"] = torch.tensor([position, has_gauss], dtype=torch.int64)
    state["numpy_cached_gaussian"] = torch.tensor(cached_gaussian, dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    if version != _PYTHON_STATE_VERSION:
        raise RuntimeError(
            f"python's random state has layout version {version}, expected {_PYTHON_STATE_VERSION}"
        )
    state["python_internal"] = torch.tensor(internal, dtype=torch.int64)
    state["python_gauss_next"] = torch.tensor(
        math.nan if gauss_next is None else gauss_next, dtype=torch.float64
    )
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Set every generator from rng_state_tensors(); CUDA devices absent now or then are left as they are."""
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"torch_cuda_{index}" in state:
                torch.cuda.set_rng_state(state[f"torch_cuda_{index}"], device=index)
    position, has_gauss = state["numpy_position_has_gauss"].tolist()
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            position,
            has_gauss,
            float(state["numpy_cached_gaussian"]),
        )
    )
    gauss_next = float(state["python_gauss_next"])
    random.setstate(
        (
            _PYTHON_STATE_VERSION,
            tuple(state["python_internal"].tolist()),
            None if math.isnan(gauss_next) else gauss_next,
        )
    )
