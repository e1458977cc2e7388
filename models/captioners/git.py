"""GIT (GitForCausalLM): a CLIP ViT encodes the image, and one BERT-style decoder reads the projected patch
tokens and the text as one sequence (no cross-attention).

GitModel.forward puts the image's projected patch tokens before the text embeddings itself, so the model's
logits cover the image positions too, and it only takes pixel_values. image_states are the projected patch
tokens instead (computed once per image), and text_logits runs the decoder on [patch tokens, text] with the
model's own embeddings, mask and layers. Text position embeddings count from the first text token, so cached
steps offset them by the cached text length, not by the whole cache (which holds the patch tokens too).
Captions start from [CLS] (the tokenizer's cls token, which the real checkpoints also set as bos) and end at
[SEP] (eos); a prompt goes between [CLS] and the caption, without the [SEP] the tokenizer would append.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask

from cycletune.models.captioners.spec import CaptionerSpec, ImageGeometry
from cycletune.models.tiny_vocabulary import check_vocab_size, clean_words, seeded, write_bert_vocab

# Patch tokens attend to each other both ways (one block); text tokens (-1) stay causal.
IMAGE_BLOCK, CAUSAL = 0, -1


class GitSpec(CaptionerSpec):
    name = "git"
    model_types = ("git",)
    # The decoder's self-attention query/key/value and output projection. A regex string (peft full-matches
    # it against module names) so the vision tower's `self_attn.{q,k,v,out}_proj`, the visual projection and
    # the decoder's feed-forward stay untouched.
    lora_targets = r"git\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"

    def image_geometry(self, processor: Any) -> ImageGeometry:
        """GIT's CLIPImageProcessor resizes the shortest edge, then center-crops a square: the crop's side."""
        image_processor = processor.image_processor
        if not image_processor.do_center_crop:
            return super().image_geometry(processor)
        crop = image_processor.crop_size
        if crop["height"] != crop["width"]:
            raise ValueError(f"captioner image processor crop_size {dict(crop)} must be square")
        return ImageGeometry(
            crop["height"], tuple(image_processor.image_mean), tuple(image_processor.image_std)
        )

    def prefix_ids(self, processor: Any, config: PretrainedConfig, prompt: str | None) -> list[int]:
        prompt_ids = processor.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        return [processor.tokenizer.cls_token_id, *prompt_ids]

    def end_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """eos ([SEP]): generate() stops at it."""
        return config.eos_token_id

    def image_states(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected patch tokens GitModel.forward puts before the text: [B, patches + 1, hidden]."""
        features = model.git.image_encoder(pixel_values).last_hidden_state
        return model.git.visual_projection(features)

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
        """GitModel.forward after its vision encoder, from image_states: logits of the text positions only.

        The first call (no cache yet) runs [patch tokens, text]; cached calls run the new text alone, the
        patch tokens' keys/values being in the cache.

        GitEmbeddings adds position embeddings to its word embeddings in place, so it always gets a copy of
        them: of the caller's `inputs_embeds`, and of the lookup of `input_ids`, which gradient checkpointing
        makes a leaf that requires grad (transformers' enable_input_require_grads hook on GIT, whose main
        input is input_ids), where an in-place add fails.

        GitEncoder hands the cache to its layers positionally, where transformers does not drop it under
        gradient checkpointing: a recompute in backward would append the keys/values a second time, which is
        why cached calls must come with checkpointing off (CaptionerSpec.text_logits).
        """
        git = model.git
        image_tokens = image_states.shape[1]
        if use_cache and cache is None:
            cache = DynamicCache(config=model.config)
        cached = cache.get_seq_length() if cache is not None else 0
        word_embeds = git.embeddings.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        text_embeds = git.embeddings(
            inputs_embeds=word_embeds.clone(), cache_length=max(cached - image_tokens, 0)
        )
        hidden = text_embeds if cached else torch.cat([image_states, text_embeds], dim=1)
        blocks = torch.full(hidden.shape[:2], CAUSAL, dtype=torch.long, device=hidden.device)
        if not cached:
            blocks[:, :image_tokens] = IMAGE_BLOCK
        if attention_mask is not None:
            image_columns = attention_mask.new_ones(attention_mask.shape[0], image_tokens)
            attention_mask = torch.cat([image_columns, attention_mask], dim=1)
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            block_sequence_ids=blocks,
        )
        hidden = git.encoder(hidden, attention_mask=mask, cache=cache, use_cache=use_cache).last_hidden_state
        text_hidden = hidden if cached else hidden[:, image_tokens:]
        return model.output(text_hidden), cache

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
        """Random-init GitForCausalLM + GitProcessor (CLIPImageProcessor, BERT WordPiece tokenizer) in out_dir.

        `vision_options` override GitVisionConfig arguments (widths, heads, patch size) and `text_options`
        GitConfig's own (decoder widths, a vocabulary larger than the tokenizer's), for stand-ins of real sizes.
        """
        from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vocab = write_bert_vocab(clean_words(vocab_words), out_dir)
        # The real checkpoints use bert-base-uncased with only these two model inputs.
        tokenizer = BertTokenizer(
            vocab=vocab, model_max_length=64, model_input_names=["input_ids", "attention_mask"]
        )
        # One tiny transformer shape for the vision tower and the decoder alike.
        layers = {
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
        }
        special_ids = {
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        text_config = {"vocab_size": len(tokenizer), "max_position_embeddings": 64, **layers, **special_ids}
        text_config |= text_options or {}
        check_vocab_size(text_config["vocab_size"], len(tokenizer), "captioner")
        # The vision tower initializes from its own initializer_range (GitVisionConfig's 0.02, spelled out):
        # random patch tokens then differ between solid colours, which training must tell apart.
        vision_config = {"image_size": image_size, "patch_size": 8, "initializer_range": 0.02, **layers}
        vision_config |= vision_options or {}
        with seeded(seed):
            model = GitForCausalLM(GitConfig(vision_config=vision_config, **text_config))
        # As the real checkpoints' processor: shortest edge resized to the side, then a square center crop.
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        model.save_pretrained(out_dir)
        GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
        return out_dir
