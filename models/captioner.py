"""Image captioner wrapper: differentiable preprocessing, teacher-forced logits, per-sample loss.

Takes pixels01 ([B, 3, H, W] floats in [0, 1]) everywhere, so gradients from a generated image can flow into
the captioner's loss. Decoding (generate, sampled and Gumbel-softmax captions) is in
models/caption_decoding.py, mixed into Captioner; what differs between model families (BLIP, GIT, BLIP-2,
IDEFICS, SmolVLM) is in models/captioners/, one file per family.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from cycletune.models.caption_decoding import IGNORE_INDEX, CaptionDecoding
from cycletune.models.captioners import spec_for
from cycletune.models.device_transfer import to_device
from cycletune.models.forward_routing import RunsInForward
from cycletune.models.hub_kernels import WITHOUT_HUB_KERNELS


def _token_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy [R, L - 1] of each label token (labels[:, i + 1] against logits[:, i]); 0 where ignored."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        labels[:, 1:],
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )


def _rows_per_image(rows: int, images: int) -> int:
    if images == 0 or rows % images:
        raise ValueError(f"{rows} token rows do not split evenly over {images} images")
    return rows // images


class Captioner(CaptionDecoding, RunsInForward):
    """A captioning model and its processor, speaking pixels01 and plain caption strings."""

    def __init__(
        self, model: torch.nn.Module, processor: Any, *, max_length: int = 40, prompt: str | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.max_length = max_length
        self.spec = spec_for(model.config)
        self.prompt = self.spec.default_prompt if prompt is None else prompt
        # Built once: every teacher-forced row and every decode starts with it (a chat template, for some).
        self._own_prefix = self._build_prefix(self.prompt)
        geometry = self.spec.image_geometry(processor)
        self.image_size: int = geometry.size
        channel_shape = (1, 3, 1, 1)
        mean = torch.tensor(geometry.mean, dtype=torch.float32).view(channel_shape)
        std = torch.tensor(geometry.std, dtype=torch.float32).view(channel_shape)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        max_length: int = 40,
        prompt: str | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> Captioner:
        """Load a hub id or local folder holding a captioning model and its processor (no remote code).

        prompt: what captions continue; None: the family's default (models/captioners/).
        """
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        spec_for(config)  # fail on unsupported families before loading weights
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype, **WITHOUT_HUB_KERNELS
        )
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        return cls(model, processor, max_length=max_length, prompt=prompt)

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
        """Teacher-forcing rows: the prefix (start token, prompt...), the caption's tokens, the end token, padding.

        Labels are the caption's tokens and the end token only. max_length counts the caption's tokens plus a
        start and an end token (the caption is cut to max_length - 2 tokens), whatever the prefix's length.
        """
        if not captions or not all(isinstance(caption, str) for caption in captions):
            raise ValueError(f"tokenize expects a non-empty list of caption strings, got {captions!r}")
        prefix = self.prefix_ids()
        end, pad = self.spec.end_token_id(self.processor, self.model.config), self.pad_token_id
        bodies = self.spec.caption_ids(self.tokenizer, captions, self.max_length - 2, self.prompt)
        width = len(prefix) + max(len(body) for body in bodies) + 1
        input_ids = torch.full((len(bodies), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, body in enumerate(bodies):
            caption = torch.tensor([*body, end], dtype=torch.long)
            length = len(prefix) + len(caption)
            input_ids[row, : len(prefix)] = prefix
            input_ids[row, len(prefix) : length] = caption
            attention_mask[row, :length] = 1
            labels[row, len(prefix) : length] = caption
        return {
            "input_ids": to_device(input_ids, self.device),
            "attention_mask": to_device(attention_mask, self.device),
            "labels": to_device(labels, self.device),
        }

    def prefix_ids(self, prompt: str | None = None) -> torch.Tensor:
        """[start token, prompt tokens...] (the family's layout): what every caption continues.

        prompt None: the captioner's own (captioner.prompt, else the family's default).
        """
        return self._own_prefix if prompt is None else self._build_prefix(prompt)

    def _build_prefix(self, prompt: str | None) -> torch.Tensor:
        return torch.tensor(self.spec.prefix_ids(self.processor, self.model.config, prompt), dtype=torch.long)

    @property
    def pad_token_id(self) -> int:
        return self.spec.pad_token_id(self.processor, self.model.config)

    @property
    def caption_start(self) -> int:
        """Position of the prefix's last token in tokenize()'s rows: the slot whose logits predict the
        caption's first token, and position 0 of a soft caption (see caption_part)."""
        return len(self.prefix_ids()) - 1

    def caption_part(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, L, ...] of tokenize()'s layout from caption_start on: one start slot, then the caption."""
        return rows[:, self.caption_start :]

    def logits(
        self, pixels01: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced text-decoder logits [B, L, V]; logits[:, i] predicts token i + 1."""
        return self.spec.logits(self.model, self.preprocess(pixels01), input_ids, attention_mask)

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
        token_losses = _token_nll(self.logits(pixels01, input_ids, attention_mask), labels, label_smoothing)
        token_counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return token_losses.sum(dim=1) / token_counts

    @property
    def vocab_size(self) -> int:
        """Rows of the decoder's word embeddings: the last dimension of logits and of soft-token probs."""
        return self.spec.word_embedding_matrix(self.model).shape[0]

    def _image_states(self, pixels01: torch.Tensor, copies: int) -> torch.Tensor:
        """Encoder states per image, each repeated `copies` times for that many consecutive text rows."""
        states = self.spec.image_states(self.model, self.preprocess(pixels01))
        return states.repeat_interleave(copies, dim=0) if copies > 1 else states

    def sequence_logprobs(
        self,
        pixels01: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced log-likelihood [R] of each row's label tokens (a sum over tokens).

        R may be a multiple of the number of images, each image's rows consecutive (sample_captions' layout):
        the vision encoder then runs once per image rather than once per row.
        """
        copies = _rows_per_image(input_ids.shape[0], pixels01.shape[0])
        logits, _ = self.spec.text_logits(
            self.model,
            self._image_states(pixels01, copies),
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
        return -_token_nll(logits, labels).sum(dim=1)

    @property
    def has_adapters(self) -> bool:
        """Whether the model carries peft (LoRA) adapters, so that its base model can still be run."""
        return isinstance(self.model, PeftModel)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base captioner (LoRA adapters off): the model training started from, e.g. for a KL term."""
        if not self.has_adapters:
            raise ValueError(
                "the captioner has no LoRA adapters to disable (full fine-tuning keeps no copy of the base model)"
            )
        with self.model.disable_adapter():
            yield
