"""Decoding stops together on every rank when the model is sharded (FSDP), and on its own rank otherwise."""

from __future__ import annotations

import torch.multiprocessing as mp
from cycle_runs import free_port
from lockstep_probe import ENDS_AT, steps_taken


def test_a_rank_whose_captions_ended_keeps_stepping_only_while_the_model_is_sharded() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(steps_taken, args=(2, free_port(), results), nprocs=2, join=True)
        steps = dict(results)
    unsharded = {rank: counts[0] for rank, counts in steps.items()}
    sharded = {rank: counts[1] for rank, counts in steps.items()}
    assert unsharded == ENDS_AT, "an unsharded model stops each rank's loop when its own captions end"
    assert sharded == {0: ENDS_AT[1], 1: ENDS_AT[1]}, "sharded, the ranks stop together at the last end"
