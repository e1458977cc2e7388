"""SmolVLM (SmolVLMForConditionalGeneration, and Idefics3ForConditionalGeneration, its first architecture): a
SigLIP-style vision tower, a connector (pixel shuffle + linear) into the width of a Llama decoder, which reads
the image as a run of `<image>` placeholder tokens in its prompt.

A chat model: it captions when asked. Every caption continues the chat template's user turn (the image, then
the prompt) and the generation prompt, "<|im_start|>User:<image>{prompt}<end_of_utterance>\\nAssistant:", with
`<image>` expanded as the processor expands one image without splitting: <fake_token_around_image>
<global-img> `image_seq_len` x <image> <fake_token_around_image>. The answer starts with a space after
"Assistant:" and ends with <end_of_utterance>, as the real checkpoints answer.

Image splitting is always off here, whatever the checkpoint's processor says (the real ones split large images
into tiles plus a global view, each with its own placeholder run): Captioner.preprocess feeds one square image,
differentiably, so the prefix must hold exactly one image's placeholders.
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

from cycletune.models.captioners.spec import CaptionerSpec, ImageGeometry
from cycletune.models.tiny_vocabulary import byte_level_bpe, check_vocab_size, clean_words, seeded

# The real tokenizer's specials (HuggingFaceTB/SmolVLM-*): unk, bos, pad first, then the chat and image tokens.
_UNK, _BOS, _PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_END_OF_UTTERANCE = "<end_of_utterance>"
_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>")
# The tile tags of a split image: never in a prefix here, but real tokenizers have them and so the tiny one does.
_TILE_TAGS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
# Words of the chat template and default prompt, whole tokens in the real vocabulary (a shorter tiny prefix).
_CHAT_WORDS = ("User", "Assistant", "Describe", "sentence")
# The image-token layout of an unsplit image, in the processors' replace_image_token input format.
_ONE_UNSPLIT_IMAGE = {"rows": [[0]], "cols": [[0]]}


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrappers: `.model` of a PeftModel is peft's LoraModel, not ours."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _spliced_image(
    is_placeholder: torch.Tensor, embeds: torch.Tensor, image_states: torch.Tensor
) -> torch.Tensor:
    """embeds with the prefix's image placeholders replaced by image_states, one token each, in order.

    Only each row's first image_states.shape[1] placeholders are the prefix's: a sampled caption token that
    happens to be the placeholder id stays a text token, as in the model's own generate().
    """
    image_tokens = image_states.shape[1]
    is_image = is_placeholder & (is_placeholder.cumsum(dim=1) <= image_tokens)
    if not bool((is_image.sum(dim=1) == image_tokens).all()):
        raise ValueError(
            f"every row must start with the prefix's {image_tokens} image tokens; "
            f"found {is_image.sum(dim=1).tolist()}"
        )
    return embeds.masked_scatter(is_image[..., None], image_states.to(embeds.dtype))


class SmolVLMSpec(CaptionerSpec):
    name = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    # The Llama decoder's attention projections; the vision tower's `self_attn.{q,k,v}_proj` share the last
    # names, hence the text_model anchor.
    lora_targets = r"model\.text_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    default_prompt = "Describe this image in one sentence."

    def image_geometry(self, processor: Any) -> ImageGeometry:
        """The image processor's `size` is a longest edge (aspect kept); with splitting off it then squares the
        image to `max_image_size`'s longest edge, which is what the vision tower sees."""
        image_processor = processor.image_processor
        return ImageGeometry(
            image_processor.max_image_size["longest_edge"],
            tuple(image_processor.image_mean),
            tuple(image_processor.image_std),
        )

    def prefix_ids(self, processor: Any, config: PretrainedConfig, prompt: str | None) -> list[int]:
        """The processor's chat template and image expansion for one unsplit image, tokenized as it does."""
        content = [{"type": "image"}, *([{"type": "text", "text": prompt}] if prompt else [])]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        placeholders = processor.replace_image_token(_ONE_UNSPLIT_IMAGE, 0)
        return processor.tokenizer(text.replace(processor.image_token, placeholders, 1))["input_ids"]

    def caption_ids(
        self, tokenizer: Any, captions: Sequence[str], max_tokens: int, prompt: str | None
    ) -> list[list[int]]:
        """Each caption as an answer: after "Assistant:" with one leading space, so its first word is `Ġ`-marked."""
        answers = [f" {caption.lstrip()}" for caption in captions]
        return super().caption_ids(tokenizer, answers, max_tokens, prompt)

    def end_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        """<end_of_utterance>: ends every chat turn; the checkpoints' generation_config eos."""
        return processor.tokenizer.convert_tokens_to_ids(processor.end_of_utterance_token)

    def pad_token_id(self, processor: Any, config: PretrainedConfig) -> int:
        pad = processor.tokenizer.pad_token_id
        return self.end_token_id(processor, config) if pad is None else pad

    def image_states(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The connector's output [B, image_seq_len, text width]: what replaces the <image> placeholders.

        The vision tower and connector are called directly on [B, 3, H, W] rather than through
        get_image_features, which drops images that are all zeros after normalisation as batch padding.
        """
        inner = _unwrapped(model).model
        return inner.connector(inner.vision_model(pixel_values=pixel_values).last_hidden_state)

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
        """What forward() does after the vision tower: placeholders -> image states, Llama decoder, lm_head.

        The image goes in on the first call only, at the prefix's placeholders (found by id, or for embeddings
        by equality with the placeholder's embedding, as the model does); cached calls continue from the cache
        with text tokens or soft-token embeddings.
        """
        base = _unwrapped(model)
        text_model, placeholder = base.model.text_model, base.config.image_token_id
        embedding = text_model.get_input_embeddings()
        if inputs_embeds is None:
            inputs_embeds = embedding(input_ids)
        if cache is None or cache.get_seq_length() == 0:
            is_placeholder = (
                input_ids == placeholder
                if input_ids is not None
                else (inputs_embeds == embedding.weight[placeholder]).all(dim=-1)
            )
            inputs_embeds = _spliced_image(is_placeholder, inputs_embeds, image_states)
        outputs = text_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=use_cache
        )
        return base.lm_head(outputs.last_hidden_state), outputs.cache

    def generate(
        self, model: nn.Module, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """HF generate with one image per row ([B, 1, 3, H, W] and a full pixel mask)."""
        pixels = pixel_values[:, None]
        pixel_mask = torch.ones_like(pixels[:, :, 0], dtype=torch.bool)
        sequences = model.generate(
            input_ids=prefix_ids,
            attention_mask=torch.ones_like(prefix_ids),
            pixel_values=pixels,
            pixel_attention_mask=pixel_mask,
            **kwargs,
        )
        return sequences[:, prefix_ids.shape[1] :]

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
        model_type: str = "smolvlm",
    ) -> Path:
        """Random-init SmolVLMForConditionalGeneration + SmolVLMProcessor (GPT-2 byte-level BPE tokenizer with
        SmolVLM's specials and chat template, image splitting off) in out_dir; returns out_dir.

        model_type "idefics3" writes the same model as Idefics3ForConditionalGeneration + Idefics3Processor, the
        classes of the SmolVLM v1 checkpoints (HuggingFaceTB/SmolVLM-256M-Instruct). `vision_options` and
        `text_options` override the vision config and the Llama text config.
        """
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

        classes = _tiny_classes(model_type)
        layers = _tiny_layers(hidden_size, num_layers)
        # The vision config's 0.02 default is kept explicit: the random tower must tell solid colours apart.
        vision_defaults = {"image_size": image_size, "patch_size": 8, "initializer_range": 0.02, **layers}
        vision = vision_defaults | (vision_options or {})
        scale_factor = 2
        patches_per_side, remainder = divmod(vision["image_size"], vision["patch_size"])
        if remainder or patches_per_side % scale_factor:
            raise ValueError(
                f"image_size {vision['image_size']} must be a multiple of patch_size {vision['patch_size']} "
                f"x scale_factor {scale_factor} (the connector merges {scale_factor}x{scale_factor} patches)"
            )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = _tiny_tokenizer(clean_words(vocab_words))
        end = tokenizer.convert_tokens_to_ids(_END_OF_UTTERANCE)
        text = {
            "vocab_size": len(tokenizer),
            **layers,
            "num_key_value_heads": 1,  # grouped-query attention, as the real decoders
            "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": end,
            "pad_token_id": tokenizer.pad_token_id,
        } | (text_options or {})
        check_vocab_size(text["vocab_size"], len(tokenizer), "captioner")
        config = classes["config"](
            vision_config=vision,
            text_config={"model_type": "llama", **text},
            scale_factor=scale_factor,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        )
        with seeded(seed):
            model = classes["model"](config)
        generation = model.generation_config
        generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, end
        generation.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)
        image_processor = classes["image_processor"](
            size={"longest_edge": vision["image_size"]},
            max_image_size={"longest_edge": vision["image_size"]},
            do_image_splitting=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        processor = classes["processor"](
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=(patches_per_side // scale_factor) ** 2,
            chat_template=DEFAULT_CHAT_TEMPLATE,
            **classes["extra_parts"],
        )
        processor.save_pretrained(out_dir)
        return out_dir


def _tiny_layers(hidden_size: int, num_layers: int) -> dict[str, int]:
    """The widths and depth the tiny vision tower and decoder share."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
    }


def _tiny_tokenizer(words: Sequence[str]) -> Any:
    """GPT2Tokenizer (byte-level BPE, `Ġ` starts a word) with SmolVLM's special tokens at the real roles."""
    from transformers import GPT2Tokenizer

    specials = [_UNK, _BOS, _PAD, _END_OF_UTTERANCE, *_IMAGE_TOKENS, *_TILE_TAGS]
    bpe = json.loads(byte_level_bpe([*words, *_CHAT_WORDS], specials).to_str())["model"]
    return GPT2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(merge) for merge in bpe["merges"]],
        unk_token=_UNK,
        bos_token=_BOS,
        eos_token=_END_OF_UTTERANCE,
        pad_token=_PAD,
        extra_special_tokens=[*_IMAGE_TOKENS, *_TILE_TAGS],
        model_max_length=256,
    )


def _tiny_classes(model_type: str) -> dict[str, Any]:
    """The transformers classes of one of the family's two architectures."""
    if model_type == "smolvlm":
        from transformers import (
            SmolVLMConfig,
            SmolVLMForConditionalGeneration,
            SmolVLMImageProcessor,
            SmolVLMProcessor,
            SmolVLMVideoProcessor,
        )

        return {
            "config": SmolVLMConfig,
            "model": SmolVLMForConditionalGeneration,
            "image_processor": SmolVLMImageProcessor,
            "processor": SmolVLMProcessor,
            "extra_parts": {"video_processor": SmolVLMVideoProcessor()},
        }
    if model_type == "idefics3":
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3ImageProcessor,
            Idefics3Processor,
        )

        return {
            "config": Idefics3Config,
            "model": Idefics3ForConditionalGeneration,
            "image_processor": Idefics3ImageProcessor,
            "processor": Idefics3Processor,
            "extra_parts": {},
        }
    raise ValueError(f"model_type {model_type!r}: the smolvlm family writes 'smolvlm' or 'idefics3'")
