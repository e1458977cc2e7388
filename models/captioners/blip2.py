"""BLIP-2 with an OPT language model (Blip2ForConditionalGeneration): a ViT encodes the image, a Q-Former
reads it with a few learned queries, and language_projection(query outputs) stands in for that many
placeholder tokens of the OPT decoder's input.

Layout of a caption row, as Blip2Processor lays out one image and its text: num_query_tokens image
placeholders (config.image_token_index), then what the OPT tokenizer makes of the prompt, which starts with
its bos "</s>", then the caption. The model swaps the placeholders' embeddings for the projected queries.

Without a prompt the caption's first word carries no "Ġ" (no leading space): that is how OPT tokenizes a
text right after its bos, and what the checkpoints generate there. After a prompt the caption continues the
text with a space ("a photo of" + "Ġa"), as real text does. The caption ends with
text_config.eos_token_id, which is "\\n" in the released checkpoints (BLIP-2 was trained on captions ending
in a newline), not the tokenizer's eos "</s>": generate() stops at the config's, so training ends captions
with it too.

Only OPT: the Flan-T5 variant is an encoder-decoder (the caption is the decoder's, the image the encoder's),
which this row layout cannot express.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from cycletune.models.captioners.spec import CaptionerSpec
from cycletune.models.tiny_vocabulary import byte_level_bpe, clean_words, seeded

# The OPT tokenizer's specials in their ids' order (<s> 0, <pad> 1, </s> 2, <unk> 3); "</s>" is its bos and eos.
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# Blip2Processor's placeholder, added to the tokenizer as a special token.
IMAGE_TOKEN = "<image>"
# What BLIP-2 OPT captions end with: the checkpoints' text_config.eos_token_id is the byte-level "\n".
CAPTION_END = "\n"


class Blip2Spec(CaptionerSpec):
    name = "blip2"
    model_types = ("blip-2",)
    # The OPT decoder's self-attention projections. A regex string (peft full-matches it against module
    # names), so the vision encoder (`self_attn.qkv`), the Q-Former and language_projection stay untouched.
    lora_targets = r"language_model\.model\.decoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

    def check_config(self, config: PretrainedConfig) -> None:
        """Only OPT language models, and only revisions with image placeholder tokens."""
        model_type = config.text_config.model_type
        if model_type != "opt":
            raise ValueError(
                f"BLIP-2 captioners with a {model_type!r} language model are not supported, only 'opt' "
                "(e.g. Salesforce/blip2-opt-2.7b): the Flan-T5 variants are encoder-decoders, whose caption is "
                "not a continuation of the image placeholder row"
            )
        if config.image_token_index is None:
            raise ValueError(
                "this BLIP-2 checkpoint has no image_token_index (a revision from before image placeholder "
                "tokens); load a revision whose config and processor have them"
            )

    def prefix_ids(self, processor: Any, config: PretrainedConfig, prompt: str | None) -> list[int]:
        """Placeholders, then the tokenizer's own "</s>" + prompt: Blip2Processor's row for one image."""
        text_ids = processor.tokenizer(prompt or "")["input_ids"]
        return [config.image_token_index] * config.num_query_tokens + text_ids

    def caption_ids(
        self, tokenizer: Any, captions: Sequence[str], max_tokens: int, prompt: str | None
    ) -> list[list[int]]:
        """A space before the caption when it continues a prompt, none right after the bos."""
        continued = [f" {caption.lstrip()}" for caption in captions] if prompt else list(captions)
        return super().caption_ids(tokenizer, continued, max_tokens, prompt)

    def end_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        return config.text_config.eos_token_id

    def image_states(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """language_projection(Q-Former output) [B, num_query_tokens, D]: what fills the placeholders."""
        return model.get_image_features(pixel_values=pixel_values).pooler_output

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
        """The OPT decoder on the row's embeddings, the leading placeholders replaced by image_states.

        The placeholders are replaced by position (the first num_query_tokens of an uncached call, whose rows
        start with prefix_ids), not by matching their id as forward() does: a sampled caption may contain
        that id too, and checking the ids would wait for the device mid-step. A cached call only continues
        the text.
        """
        if cache is None:
            if input_ids is None:
                raise ValueError("the first text_logits call takes input_ids starting with the prefix")
            text_embeds = model.get_input_embeddings()(input_ids[:, image_states.shape[1] :])
            inputs_embeds = torch.cat([image_states.to(text_embeds.dtype), text_embeds], dim=1)
        elif inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        outputs = model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=use_cache
        )
        return outputs.logits, outputs.cache

    @staticmethod
    def save_tiny(
        out_dir: Path,
        *,
        seed: int = 0,
        image_size: int = 32,
        hidden_size: int = 32,
        num_layers: int = 2,
        num_query_tokens: int = 4,
        vocab_words: Sequence[str] | None = None,
    ) -> Path:
        """Random-init Blip2ForConditionalGeneration (OPT) + Blip2Processor (OPT's byte-level BPE) in out_dir.

        The tokenizer is OPT's: GPT2Tokenizer adding "</s>" as bos, "<pad>" pad, "<image>" added by the
        processor's convention; the config's image_token_index and end token ("\\n") as in the checkpoints.
        """
        from transformers import (
            AddedToken,
            Blip2Config,
            Blip2ForConditionalGeneration,
            Blip2Processor,
            BlipImageProcessor,
            GPT2Tokenizer,
        )
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = GPT2Tokenizer(
            tokenizer_object=byte_level_bpe(clean_words(vocab_words), OPT_SPECIALS),
            bos_token="</s>",
            eos_token="</s>",
            unk_token="</s>",
            pad_token="<pad>",
            add_bos_token=True,
            model_max_length=128,
        )
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
        layers = {"num_hidden_layers": num_layers, "num_attention_heads": 2}
        config = Blip2Config(
            vision_config={
                "image_size": image_size,
                "patch_size": 8,
                "hidden_size": hidden_size,
                "intermediate_size": 2 * hidden_size,
                # Blip2VisionConfig defaults to 1e-10 (weights expected from a checkpoint): random init would
                # be near-constant and the captioner could not tell images apart.
                "initializer_range": 0.02,
                **layers,
            },
            qformer_config={
                "hidden_size": hidden_size,
                "intermediate_size": 2 * hidden_size,
                "cross_attention_frequency": 1,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                **layers,
            },
            text_config={
                "model_type": "opt",
                "vocab_size": len(tokenizer),
                "hidden_size": hidden_size,
                "ffn_dim": 2 * hidden_size,
                "max_position_embeddings": tokenizer.model_max_length,
                "dropout": 0.0,
                "bos_token_id": tokenizer.bos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.convert_tokens_to_ids(tokenizer.tokenize(CAPTION_END))[0],
                **layers,
            },
            num_query_tokens=num_query_tokens,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            image_text_hidden_size=hidden_size,
        )
        with seeded(seed):
            model = Blip2ForConditionalGeneration(config)
            # The released query tokens are trained; zeros (the init) would make every placeholder's
            # embedding the same, so that a misplaced image state could not show.
            nn.init.normal_(model.query_tokens, std=config.initializer_range)
        image_processor = BlipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        model.save_pretrained(out_dir)
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
        processor.save_pretrained(out_dir)
        return out_dir
