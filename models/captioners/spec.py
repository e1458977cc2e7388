"""What the Captioner wrapper (models/captioner.py) needs to know of one captioner family, and nothing more.

A family is one subclass of CaptionerSpec in this package (blip.py, git.py, ...), listed in __init__.py's
SPECS. The wrapper does the rest for every family alike: differentiable preprocessing, teacher forcing with
the loss on the caption tokens only, nucleus and Gumbel decoding on the KV cache, log-probabilities.

Every family lays a caption row out the same way: prefix (what the caption continues: a start token, the
prompt, image placeholder tokens, a chat template's turn header) + the caption's tokens + one end token, then
padding. `prefix_ids` builds the prefix; the wrapper appends the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class ImageGeometry:
    """The square side the vision encoder takes and its per-channel normalisation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class CaptionerSpec(ABC):
    """One captioner family's specifics. Methods take the (possibly peft-wrapped) transformers model."""

    # The family's name in configs and on the command line (models.tiny --captioner NAME).
    name: ClassVar[str]
    # The config.json model_type values this family loads.
    model_types: ClassVar[tuple[str, ...]]
    # peft target_modules by default: the language side's attention projections.
    lora_targets: ClassVar[str | list[str]]
    # What the caption follows when the config sets no captioner.prompt (None: no prompt).
    default_prompt: ClassVar[str | None] = None

    def check_config(self, config: PretrainedConfig) -> None:
        """Refuse, with a ValueError naming why, a config of this model type the spec cannot drive; called
        before any weight loads. The default accepts every config of model_types."""
        return

    def image_geometry(self, processor: Any) -> ImageGeometry:
        """Read from the processor; the default is an image processor with a square height/width size."""
        image_processor = processor.image_processor
        size = image_processor.size
        if size.get("height") is None or size.get("height") != size.get("width"):
            raise ValueError(f"captioner image processor size {dict(size)} must be a square height/width")
        return ImageGeometry(
            size["height"], tuple(image_processor.image_mean), tuple(image_processor.image_std)
        )

    @abstractmethod
    def prefix_ids(self, processor: Any, config: PretrainedConfig, prompt: str | None) -> list[int]:
        """The token ids every caption of this family continues, for one image and this prompt."""

    def caption_ids(
        self, tokenizer: Any, captions: Sequence[str], max_tokens: int, prompt: str | None
    ) -> list[list[int]]:
        """Each caption's own tokens (no specials), at most max_tokens, as they follow the prefix built for
        `prompt` (a family may tokenize a caption differently after a prompt: a leading space, say)."""
        return tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_tokens)[
            "input_ids"
        ]

    @abstractmethod
    def end_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """The token that ends a caption; generate() stops at it."""

    def pad_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """What fills a row after its end token (never attended to, never a label)."""
        return processor.tokenizer.pad_token_id

    def word_embedding_matrix(self, model: nn.Module) -> torch.Tensor:
        """[V, D]: the rows the text decoder reads its tokens from, one per logit (soft tokens multiply it)."""
        return model.get_input_embeddings().weight

    @abstractmethod
    def image_states(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the text side needs of each image, computed once per image, batch first, so that
        repeat_interleave makes copies for several caption rows of the same image."""

    @abstractmethod
    def text_logits(
        self,
        model: nn.Module,
        image_states: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Logits [B, L, V] of the L text positions given (logits[:, i] predicts the token after i), and the
        KV cache to continue from. The first call gives input_ids starting with the prefix; cached calls give
        the next token's ids or embeddings only. Gradients must reach image_states and inputs_embeds.

        The caller (models/caption_decoding.py) makes cached calls, and generate, with gradient checkpointing
        off: transformers drops the cache of a checkpointed layer in train mode (or, where it does not, a
        recompute in backward would write the keys/values twice), so each step would see only its own token.
        The cost: each cached step's activations are kept for backward rather than recomputed, about what one
        teacher-forced pass over the decoded length keeps without checkpointing; teacher-forced calls and the
        image states stay checkpointed."""

    def logits(
        self, model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits of full rows (prefix included)."""
        return self.text_logits(
            model, self.image_states(model, pixel_values), input_ids=input_ids, attention_mask=mask
        )[0]

    def generate(
        self, model: nn.Module, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """Token ids generated after prefix_ids (HF generate: beams, sampling), one row per sequence.

        kwargs include eos_token_id and pad_token_id (end_token_id and pad_token_id), so that generation
        stops where training ends captions whatever the checkpoint's generation_config says. The default is
        the model's own generate on pixel_values and the prefix, which returns the prefix before the new
        tokens.
        """
        sequences = model.generate(
            pixel_values=pixel_values,
            input_ids=prefix_ids,
            attention_mask=torch.ones_like(prefix_ids),
            **kwargs,
        )
        return sequences[:, prefix_ids.shape[1] :]

    @staticmethod
    @abstractmethod
    def save_tiny(out_dir: Path, *, seed: int = 0, image_size: int = 32, **options: Any) -> Path:
        """Write a tiny random-init model of this family, its processor and a tokenizer of the family's kind."""
