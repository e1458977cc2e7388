"""BLIP (BlipForConditionalGeneration): a ViT encodes the image, a BERT-style text decoder cross-attends to it.

The BLIP tokenizer starts every text with [CLS], but BlipForConditionalGeneration.generate overwrites the
first token with text_config.bos_token_id ("[DEC]") before decoding, while forward() uses input_ids exactly
as given. Training therefore puts "[DEC]" first itself, or it would teach a start token that generation never
uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from cycletune.models.captioners.spec import CaptionerSpec
from cycletune.models.tiny_vocabulary import check_vocab_size, clean_words, seeded, write_bert_vocab

# The real BLIP tokenizer (Salesforce/blip-image-captioning-*) adds "[DEC]" as bos; generation starts from it.
BLIP_DECODER_START = "[DEC]"


class BlipSpec(CaptionerSpec):
    name = "blip"
    model_types = ("blip",)
    # The text decoder's self- and cross-attention query/key/value and each attention block's output
    # projection. A regex string (peft full-matches it against module names) so the vision encoder's
    # `self_attn.qkv` / `projection` and the decoder's feed-forward stay untouched.
    lora_targets = (
        r"text_decoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\."
        r"(self\.(query|key|value)|output\.dense)"
    )

    def prefix_ids(self, processor: Any, config: PretrainedConfig, prompt: str | None) -> list[int]:
        prompt_ids = processor.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        return [config.text_config.bos_token_id, *prompt_ids]

    def end_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """[SEP]: generate() stops at it."""
        return config.text_config.sep_token_id

    def pad_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        return config.text_config.pad_token_id

    def logits(
        self, model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits

    def generate(
        self, model: nn.Module, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        # BLIP's generate sets eos ([SEP]) and pad itself, the ids end_token_id and pad_token_id give.
        del kwargs["eos_token_id"], kwargs["pad_token_id"]
        # BLIP's generate drops the last input token (it expects the tokenizer's trailing [SEP]), so add one.
        sep_column = torch.full_like(prefix_ids[:, :1], model.config.text_config.sep_token_id)
        input_ids = torch.cat([prefix_ids, sep_column], dim=1)
        sequences = model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **kwargs,
        )
        return sequences[:, prefix_ids.shape[1] :]

    def image_states(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision encoder's last hidden state, which the text decoder cross-attends to."""
        return model.vision_model(pixel_values=pixel_values).last_hidden_state

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
        """The call forward() makes after its vision encoder, so teacher-forced results agree with logits().

        BlipTextEmbeddings adds position embeddings to `inputs_embeds` in place: pass a fresh tensor.
        """
        outputs = model.text_decoder(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            encoder_hidden_states=image_states,
            cache=cache,
            use_cache=use_cache,
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
        vocab_words: Sequence[str] | None = None,
        vision_options: dict[str, Any] | None = None,
        text_options: dict[str, Any] | None = None,
    ) -> Path:
        """Random-init BlipForConditionalGeneration + BlipProcessor (BERT WordPiece tokenizer) in out_dir.

        `vision_options` and `text_options` override BlipVisionConfig and BlipTextConfig arguments (widths,
        heads, patch size, a text vocabulary larger than the tokenizer's), for stand-ins of real sizes.
        """
        from transformers import (
            BertTokenizer,
            BlipConfig,
            BlipForConditionalGeneration,
            BlipImageProcessor,
            BlipProcessor,
        )
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vocab = write_bert_vocab(clean_words(vocab_words), out_dir)
        tokenizer = BertTokenizer(vocab=vocab, model_max_length=64)
        tokenizer.add_special_tokens({"bos_token": BLIP_DECODER_START})

        text_config = {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        } | (text_options or {})
        check_vocab_size(text_config["vocab_size"], len(tokenizer), "captioner")
        config = BlipConfig(
            vision_config={
                "image_size": image_size,
                "patch_size": 8,
                "hidden_size": hidden_size,
                "intermediate_size": 2 * hidden_size,
                "num_hidden_layers": num_layers,
                "num_attention_heads": 2,
                # BlipVisionConfig defaults to 1e-10 (weights expected from a checkpoint): random init would be
                # near-constant and the captioner could not tell images apart.
                "initializer_range": 0.02,
            }
            | (vision_options or {}),
            text_config=text_config,
            projection_dim=hidden_size,
            image_text_hidden_size=hidden_size,
        )
        with seeded(seed):
            model = BlipForConditionalGeneration(config)
        image_processor = BlipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        model.save_pretrained(out_dir)
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
        return out_dir
