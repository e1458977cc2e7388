"""A decoding loop on two gloo ranks whose captions end at different steps (run by tests/models/test_lockstep.py)."""

from __future__ import annotations

import os

import torch
from torch import distributed
from transformers import BertConfig, BertModel

from cycletune.models.lockstep import finished_everywhere, mark_sharded

# The step at which each rank's only caption ends.
ENDS_AT = {0: 1, 1: 4}


def steps_taken(rank: int, world_size: int, port: int, results: dict) -> None:
    """How many steps rank `rank`'s loop runs before finished_everywhere lets it stop, with an unsharded and
    then a sharded model: results[rank] = (unsharded steps, sharded steps)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = BertModel(
            BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
        )
        counts = []
        for sharded in (False, True):
            if sharded:
                mark_sharded(model)
            ended = torch.zeros(1, dtype=torch.bool)
            for step in range(10):
                ended |= step >= ENDS_AT[rank]
                if finished_everywhere(ended, model):
                    break
            counts.append(step)
        results[rank] = tuple(counts)
    finally:
        distributed.destroy_process_group()
