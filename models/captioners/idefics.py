"""IDEFICS (IdeficsForVisionText2Text), the open Flamingo: a Llama decoder whose gated cross-attention blocks read
a CLIP-style vision tower's patches, resampled to a few latents by a perceiver.

The image is no run of tokens in the text: IdeficsProcessor lays one image out as
`<s><fake_token_around_image><image><fake_token_around_image>` before the text, and image_attention_mask says
per text position which image its cross-attention may read. The processor opens that mask at the <image>
token, so <s> and the first fake token read no image and everything from <image> on reads it. Training rows,
cached decoding steps and HF generate all use this one rule by position (the prefix always puts <image> at
IMAGE_POSITION), which also serves soft tokens given as embeddings, where no token id tells where <image> is.

The word embedding is split in two tables (IdeficsDecoupledEmbedding): the Llama vocabulary and
`additional_vocab_size` rows for the image tokens, which the logits cover too (IdeficsDecoupledLinear); soft
tokens need both as one table (IdeficsSpec.word_embedding_matrix).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import PretrainedConfig

from cycletune.models.captioners.spec import CaptionerSpec
from cycletune.models.tiny_vocabulary import check_vocab_size, clean_words, seeded, sentencepiece_bpe

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
# The <image> token's index in every prefix: after <s> and the opening fake token.
IMAGE_POSITION = 2
# The tokens after the Llama vocabulary, in id order (IDEFICS' `additional_vocab_size` embedding rows).
IMAGE_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN)
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


def _idefics_model(model: nn.Module) -> nn.Module:
    """The IdeficsModel inside a (possibly peft-wrapped) IdeficsForVisionText2Text."""
    return (model.get_base_model() if isinstance(model, PeftModel) else model).model


def image_attention_mask(rows: int, length: int, past_length: int, device: torch.device) -> torch.Tensor:
    """[rows, length, 1]: 1 where the text position (counted from the row's start) reads the one image, as
    IdeficsProcessor marks a row up to its end token (after it, only padding follows)."""
    positions = torch.arange(past_length, past_length + length, device=device)
    return (positions >= IMAGE_POSITION).long().expand(rows, -1)[..., None]


class IdeficsSpec(CaptionerSpec):
    name = "idefics"
    model_types = ("idefics",)
    # The Llama decoder's self-attention and the gated cross-attention (text queries reading the image)
    # projections. A regex string (peft full-matches it against module names) so the vision tower's and the
    # perceiver's q/k/v projections and every feed-forward stay untouched.
    lora_targets = (
        r"model\.(layers\.\d+\.self_attn|gated_cross_attn_layers\.\d+\.cross_attn)\."
        r"(q_proj|k_proj|v_proj|o_proj)"
    )
    # The base checkpoints are no chat models: a plain cue after the image. (The instruct checkpoints' turns
    # put "User:" before the image, which this image-first prefix does not lay out.)
    default_prompt = "Caption:"

    def prefix_ids(self, processor: Any, config: PretrainedConfig, prompt: str | None) -> list[int]:
        """Tokenized as IdeficsProcessor tokenizes [image, prompt]: one string, specials inline, the prompt
        stripped of spaces (so a Llama tokenizer puts no word-start marker on its first word)."""
        tokenizer = processor.tokenizer
        image = f"{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN}{FAKE_IMAGE_TOKEN}"
        text = f"{tokenizer.bos_token}{image}{(prompt or '').strip(' ')}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[IMAGE_POSITION] != processor.image_token_id:
            raise ValueError(
                f"IDEFICS prefix {tokenizer.convert_ids_to_tokens(ids)} has no {IMAGE_TOKEN} at {IMAGE_POSITION}"
            )
        return ids

    def end_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """</s>: generate() stops at it (the checkpoint's eos)."""
        return processor.tokenizer.eos_token_id

    def pad_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """The config's pad id (<unk> in Llama's layout): the tokenizer need not name a pad token."""
        return config.pad_token_id

    def word_embedding_matrix(self, model: nn.Module) -> torch.Tensor:
        """IdeficsDecoupledEmbedding's two tables as one [vocabulary + additional, hidden] matrix, rows in
        token-id order (what one-hot or soft tokens multiply); concatenated on each call, so gradients reach
        both tables."""
        embedding = model.get_input_embeddings()
        if getattr(embedding, "num_additional_embeddings", 0) == 0:
            return embedding.weight
        return torch.cat([embedding.weight, embedding.additional_embedding.weight])

    def image_states(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The perceiver's latents (or, without a resampler, the vision tower's patches): what every
        cross-attention block reads, computed once per image."""
        idefics = _idefics_model(model)
        states = idefics.vision_model(pixel_values=pixel_values).last_hidden_state
        return idefics.perceiver_resampler(states) if idefics.config.use_resampler else states

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
        """The model's own forward on precomputed image states (perceiver_embeddings skips the resampler,
        image_encoder_embeddings the vision tower), with image_attention_mask for the positions given.
        """
        text = input_ids if input_ids is not None else inputs_embeds
        past_length = cache.get_seq_length() if cache is not None else 0
        image_key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
        outputs = model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            image_attention_mask=image_attention_mask(text.shape[0], text.shape[1], past_length, text.device),
            cache=cache,
            use_cache=use_cache,
            **{image_key: image_states},
        )
        return outputs.logits, outputs.cache

    def generate(
        self, model: nn.Module, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """HF generate from pixel_values (one image per row: [B, 1, C, H, W]); it extends image_attention_mask
        with its last row at every step, as text_logits does."""
        rows, length = prefix_ids.shape
        sequences = model.generate(
            input_ids=prefix_ids,
            attention_mask=torch.ones_like(prefix_ids),
            pixel_values=pixel_values[:, None],
            image_attention_mask=image_attention_mask(rows, length, 0, prefix_ids.device),
            **kwargs,
        )
        return sequences[:, length:]

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
        """Random-init IdeficsForVisionText2Text + IdeficsProcessor (Llama SentencePiece-style BPE) in out_dir.

        Laid out like HuggingFaceM4/idefics-9b: the image tokens are the two `additional_vocab_size` rows after
        the Llama vocabulary, a perceiver resamples the patches. Unlike it, the alpha gates of the gated
        cross-attention start at one ("ones", tanh(1) ~ 0.76) instead of zero: with zero gates a random-init
        model's text never sees the image, so LoRA (which trains no gate) could not make captions depend on
        it and T2I2T would send no gradient into the image. A gated block sits before every second decoder
        layer (idefics-9b: every fourth), so the block indexing is exercised. Nothing is frozen (the freeze_*
        flags default to freezing the text and vision towers at init).
        `vision_options` and `text_options` override the vision config and the text config arguments.
        """
        from transformers import (
            IdeficsConfig,
            IdeficsForVisionText2Text,
            IdeficsImageProcessor,
            IdeficsProcessor,
            LlamaTokenizer,
        )

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # LlamaTokenizer builds its own pipeline around a BPE vocabulary and merges (as from_pretrained does).
        bpe = json.loads(sentencepiece_bpe(clean_words(vocab_words), LLAMA_SPECIALS).to_str())["model"]
        tokenizer = LlamaTokenizer(
            vocab=bpe["vocab"],
            merges=[tuple(merge) for merge in bpe["merges"]],
            legacy=False,
            add_bos_token=True,
            pad_token="<unk>",
            extra_special_tokens=list(IMAGE_TOKENS),
            model_max_length=128,
        )
        text_config = {
            "vocab_size": len(bpe["vocab"]),
            "additional_vocab_size": len(IMAGE_TOKENS),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        } | (text_options or {})
        check_vocab_size(
            text_config["vocab_size"] + text_config["additional_vocab_size"], len(tokenizer), "captioner"
        )
        config = IdeficsConfig(
            **text_config,
            alpha_initializer="ones",
            cross_layer_interval=2,
            freeze_text_layers=False,
            freeze_vision_layers=False,
            use_resampler=True,
            perceiver_config={
                "use_resampler": True,
                "resampler_n_latents": 4,
                "resampler_depth": 1,
                "resampler_n_heads": 2,
                "resampler_head_dim": hidden_size // 2,
            },
            vision_config={
                "embed_dim": hidden_size,
                "image_size": image_size,
                "patch_size": 8,
                "intermediate_size": 2 * hidden_size,
                "num_hidden_layers": num_layers,
                "num_attention_heads": 2,
                "initializer_range": 0.02,
            }
            | (vision_options or {}),
        )
        with seeded(seed):
            model = IdeficsForVisionText2Text(config)
        model.save_pretrained(out_dir)
        image_processor = IdeficsImageProcessor(image_size=image_size)
        IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
        return out_dir
