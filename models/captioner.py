"""Image captioner wrapper: differentiable preprocessing, teacher-forced logits, per-sample loss, generation.

Takes pixels01 ([B, 3, H, W] floats in [0, 1]) everywhere, so gradients from a generated image can flow into
the captioner's loss. The model-family specifics (which token starts decoding, how the text decoder is
called) live in one small class per family; BLIP is implemented, GIT / BLIP-2 would add their own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from models.computation import RunsInForward

IGNORE_INDEX = -100


class _BlipDecoding:
    """BLIP: a ViT encodes the image, a BERT-style text decoder cross-attends to it.

    The BLIP tokenizer starts every text with [CLS], but BlipForConditionalGeneration.generate overwrites
    the first token with text_config.bos_token_id ("[DEC]") before decoding, while forward() uses input_ids
    exactly as given. Training must therefore put "[DEC]" first itself, or it teaches a start token that
    generation never uses.
    """

    def start_token_id(self, config: PretrainedConfig) -> int:
        return config.text_config.bos_token_id

    def logits(
        self, model: torch.nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits

    def generate(
        self, model: torch.nn.Module, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """Token ids generated after prefix_ids ([start, prompt...]), one row per returned sequence."""
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


_DECODINGS = {"blip": _BlipDecoding()}


def _decoding_for(config: PretrainedConfig) -> _BlipDecoding:
    if config.model_type not in _DECODINGS:
        raise ValueError(
            f"captioner model type {config.model_type!r} is not supported; supported: {sorted(_DECODINGS)}"
        )
    return _DECODINGS[config.model_type]


class Captioner(RunsInForward):
    """A captioning model and its processor, speaking pixels01 and plain caption strings."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, max_length: int = 40) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.max_length = max_length
        self._decoding = _decoding_for(model.config)
        image_processor = processor.image_processor
        size = image_processor.size
        if size.get("height") is None or size.get("height") != size.get("width"):
            raise ValueError(f"captioner image processor size {dict(size)} must be a square height/width")
        self.image_size: int = size["height"]
        channel_shape = (1, 3, 1, 1)
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(channel_shape)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(channel_shape)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        max_length: int = 40,
    ) -> Captioner:
        """Load a hub id or local folder holding a captioning model and its processor."""
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        _decoding_for(config)  # fail on unsupported families before loading weights
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype
        )
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        return cls(model, processor, max_length=max_length)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, pixels01: torch.Tensor) -> torch.Tensor:
        """pixels01 -> the model's pixel_values, differentiably (bicubic antialiased resize, mean/std)."""
        if pixels01.ndim != 4 or pixels01.shape[1] != 3:
            raise ValueError(f"captioner expects pixels01 of shape [B, 3, H, W], got {tuple(pixels01.shape)}")
        # Resize and normalise in float32 whatever the model's dtype: bf16 bicubic is coarse (or unsupported).
        pixels = pixels01.to(device=self.pixel_mean.device, dtype=torch.float32)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(
                pixels,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
            # The HF processor resizes 8-bit images, so bicubic overshoot is clipped there too.
            pixels = pixels.clamp(0.0, 1.0)
        return ((pixels - self.pixel_mean.float()) / self.pixel_std.float()).to(self.dtype)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Decoder inputs and labels; position 0 holds the token generate() starts from."""
        if not captions or not all(isinstance(caption, str) for caption in captions):
            raise ValueError(f"tokenize expects a non-empty list of caption strings, got {captions!r}")
        encoded = self.tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        # The tokenizer's own leading special token ([CLS] for BLIP) is the slot for the decoder start token.
        if not torch.isin(input_ids[:, 0], torch.tensor(self.tokenizer.all_special_ids)).all():
            raise ValueError(
                f"captioner tokenizer {type(self.tokenizer).__name__} does not start with a special token"
            )
        input_ids[:, 0] = self._decoding.start_token_id(self.model.config)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "labels": labels.to(self.device),
        }

    def logits(
        self, pixels01: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced text-decoder logits [B, L, V]; logits[:, i] predicts token i + 1."""
        return self._decoding.logits(self.model, self.preprocess(pixels01), input_ids, attention_mask)

    def caption_loss(
        self,
        pixels01: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Per-sample caption cross-entropy [B]: the mean over that sample's non-ignored label tokens.

        Computed here rather than by the model, whose own loss is one mean over all tokens of the batch (with
        whatever label_smoothing its config carries), so that callers can weight and reduce samples themselves.
        """
        logits = self.logits(pixels01, input_ids, attention_mask)[:, :-1].float()
        targets = labels[:, 1:]
        token_losses = F.cross_entropy(
            logits.transpose(1, 2),
            targets,
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
            reduction="none",
        )
        token_counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return token_losses.sum(dim=1) / token_counts

    @torch.no_grad()
    def generate(
        self,
        pixels01: torch.Tensor,
        *,
        num_beams: int = 1,
        do_sample: bool = False,
        top_p: float | None = None,
        temperature: float = 1.0,
        num_return_sequences: int = 1,
        max_new_tokens: int | None = None,
        prompt: str | None = None,
    ) -> list[list[str]]:
        """Per image, num_return_sequences captions (beam search or nucleus sampling), prompt stripped."""
        if not do_sample and num_return_sequences > num_beams:
            raise ValueError(
                f"num_return_sequences={num_return_sequences} needs do_sample=True or num_beams >= it "
                f"(got num_beams={num_beams})"
            )
        pixel_values = self.preprocess(pixels01)
        prompt_ids = self.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        prefix = torch.tensor(
            [self._decoding.start_token_id(self.model.config), *prompt_ids], device=self.device
        )
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        new_tokens = self._decoding.generate(
            self.model,
            pixel_values,
            prefix.expand(pixel_values.shape[0], -1),
            num_beams=num_beams,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            max_new_tokens=max_new_tokens or self.max_length,
            **sampling,
        )
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return [
            texts[start : start + num_return_sequences]
            for start in range(0, len(texts), num_return_sequences)
        ]
