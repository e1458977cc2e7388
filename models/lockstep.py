"""Decoding loops that stop together on every rank when the model is sharded across the ranks.

A decoding loop stops once every caption of its batch has ended. When a model's blocks are sharded over the
ranks (FSDP), each block's forward gathers its weights from every rank, so a rank whose captions ended early
must go on stepping until every rank's have ended; otherwise the others wait forever for its part of the
gather. transformers' generate does this (synced_gpus) for a model it sees as FSDP-managed through its flag;
the trainer sets that flag on the models it shards (`mark_sharded`), and the loops here read the same flag.
"""

from __future__ import annotations

import torch
from torch import distributed
from transformers import PreTrainedModel

# transformers' own mark of an FSDP-managed model, which its generate reads to decode with synced_gpus.
FSDP_FLAG = "_is_fsdp_managed_module"


def mark_sharded(model: torch.nn.Module) -> None:
    """Flag every transformers model inside `model` as FSDP-managed (generate then decodes in lockstep)."""
    for part in model.modules():
        if isinstance(part, PreTrainedModel):
            setattr(part, FSDP_FLAG, True)


def finished_everywhere(ended: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether a decoding loop may stop: every row of `ended` is True, on every rank when `model` is sharded
    (one all-reduce per step, only then)."""
    done = ended.all()
    if not (getattr(model, FSDP_FLAG, False) and distributed.is_available() and distributed.is_initialized()):
        return bool(done)
    flag = done.to(torch.float32).reshape(1)
    distributed.all_reduce(flag, op=distributed.ReduceOp.MIN)
    return bool(flag.item())
