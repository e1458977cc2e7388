"""The vocabulary bridge into every text encoder a generator family conditions on: one VocabularyBridge
(models/bridge.py) per encoder (SD: one CLIP; SDXL: two CLIPs; SD3: two CLIPs and T5; Flux: CLIP and T5),
each built against that encoder's tokenizer and token budget, so a soft caption reaches each encoder laid out
as its own tokenizer lays text out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cycletune.models.bridge import VocabularyBridge, describe_coverage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cycletune.models.generator import Generator


class GeneratorBridge(nn.Module):
    """One VocabularyBridge per text encoder of a generator, in the family's encoder order."""

    def __init__(self, bridges: list[VocabularyBridge], encoder_names: list[str]) -> None:
        super().__init__()
        if len(bridges) != len(encoder_names) or not bridges:
            raise ValueError(f"{len(bridges)} bridges for {len(encoder_names)} text encoders")
        self.bridges = nn.ModuleList(bridges)
        self.encoder_names = list(encoder_names)

    @classmethod
    def build(
        cls,
        captioner_tokenizer: PreTrainedTokenizerBase,
        generator: Generator,
        *,
        end_token_id: int | None = None,
        source_vocab_size: int | None = None,
    ) -> GeneratorBridge:
        bridges = [
            VocabularyBridge.build(
                captioner_tokenizer,
                tokenizer,
                end_token_id=end_token_id,
                max_length=length,
                source_vocab_size=source_vocab_size,
            )
            for tokenizer, length in zip(generator.tokenizers, generator.token_lengths(), strict=True)
        ]
        return cls(bridges, [slot.encoder for slot in generator.spec.text_encoders])

    def describe_coverage(self) -> str:
        """Each encoder's coverage (VocabularyBridge.coverage) in words, for the start-up log."""
        return "; ".join(
            f"{name}: {describe_coverage(bridge.coverage())}"
            for name, bridge in zip(self.encoder_names, self.bridges, strict=True)
        )

    def encode(self, generator: Generator, probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A soft caption [B, L, V_captioner] (position 0 the start slot) -> the generator's conditioning, with
        gradient to probs: each bridge embeds it for its encoder, which then runs on the embeddings."""
        embeds, eos_positions = [], []
        for bridge, encoder in zip(self.bridges, generator.text_encoders, strict=True):
            embeds.append(bridge.embed(probs, attention_mask, encoder.get_input_embeddings()))
            eos_positions.append(_eos_positions(bridge, attention_mask))
        return generator.encode_token_embeddings(embeds, eos_positions)

    @torch.no_grad()
    def mass_coverage(self, probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The smallest share of valid probability mass any encoder's bridge maps to a non-unk token."""
        return torch.stack([bridge.mass_coverage(probs, attention_mask) for bridge in self.bridges]).min()


def _eos_positions(bridge: VocabularyBridge, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] where each row's eos lands in the bridge's output: the caption's end token (the last valid position;
    the start slot becomes bos, or is dropped where the target has none), or the last slot when truncated."""
    length = attention_mask.sum(dim=1) - (0 if bridge.bos_id is not None else 1)
    return length.clamp(max=bridge.max_length) - 1
