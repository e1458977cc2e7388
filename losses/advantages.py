"""Group-baseline advantages shared by the policy-gradient cycle modes (i2t2i and t2i2t reward)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, std_floor: float) -> torch.Tensor:
    """Advantages [B, K] of each group's K candidates: (r - mean_K r) / max(std_K r, std_floor).

    Dividing by the bare group std would blow reward gaps that are pure noise (candidates the judge finds
    alike) up to unit-scale advantages; the floor keeps gaps well below it small, while groups whose
    rewards really differ (std above the floor) are standardised as usual.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / rewards.std(dim=1, correction=0, keepdim=True).clamp_min(std_floor)
