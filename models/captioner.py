"""Image captioner wrapper: differentiable preprocessing, teacher-forced logits, per-sample loss, generation.

Takes pixels01 ([B, 3, H, W] floats in [0, 1]) everywhere, so gradients from a generated image can flow into
the captioner's loss. The model-family specifics (which token starts decoding, how the text decoder is
called) live in one small class per family; BLIP is implemented, GIT / BLIP-2 would add their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from models.device_transfer import to_device
from models.forward_routing import RunsInForward
from models.modes import gradient_checkpointing_off

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
        with gradient_checkpointing_off(model.text_decoder):  # keeps generate's cache (see text_logits)
            sequences = model.generate(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **kwargs,
            )
        return sequences[:, prefix_ids.shape[1] :]

    def end_token_id(self, config: PretrainedConfig) -> int:
        """The token generate() stops at ([SEP]); a caption ends with it."""
        return config.text_config.sep_token_id

    def image_states(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the text decoder cross-attends to; computed once per image for every decoding step."""
        return model.vision_model(pixel_values=pixel_values).last_hidden_state

    def word_embeddings(self, model: torch.nn.Module) -> torch.nn.Embedding:
        return model.get_input_embeddings()

    def text_logits(
        self,
        model: torch.nn.Module,
        image_states: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Decoder logits given precomputed image states, and the key/value cache to continue from.

        The same call forward() makes after its vision encoder, so teacher-forced results agree with logits().
        Note BlipTextEmbeddings adds position embeddings to `inputs_embeds` in place: pass a fresh tensor.

        A cached call runs with the decoder's gradient checkpointing off. transformers drops the cache of a
        checkpointed decoder in train mode (a recompute in backward would append the keys/values again), so
        each step would see only its own token. The cost: each cached step's activations are kept for
        backward rather than recomputed, about what one teacher-forced decoder pass over the decoded length
        keeps without checkpointing (the keys/values themselves are in the cache either way); teacher-forced
        calls and the vision encoder stay checkpointed.
        """
        with gradient_checkpointing_off(model.text_decoder) if use_cache else nullcontext():
            outputs = model.text_decoder(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                encoder_hidden_states=image_states,
                cache=cache,
                use_cache=use_cache,
            )
        return outputs.logits, outputs.cache


_DECODINGS = {"blip": _BlipDecoding()}


def _decoding_for(config: PretrainedConfig) -> _BlipDecoding:
    if config.model_type not in _DECODINGS:
        raise ValueError(
            f"captioner model type {config.model_type!r} is not supported; supported: {sorted(_DECODINGS)}"
        )
    return _DECODINGS[config.model_type]


def gumbel_softmax_relaxed(
    logits: torch.Tensor, gumbel_noise: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The Gumbel-softmax (Concrete) relaxation of a categorical sample: softmax((logits + g) / temperature)."""
    return torch.softmax((logits + gumbel_noise) / temperature, dim=-1)


def gumbel_softmax_st(logits: torch.Tensor, gumbel_noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Straight-through Gumbel-softmax: forward the one-hot Gumbel-max sample, backward the relaxed gradient.

    Written `hard + (relaxed - relaxed.detach())`: x - x is exactly 0 in floating point, so the forward is an
    exact one-hot (soft-token consumers then match the hard-token path bit for bit), which the common
    `hard - relaxed.detach() + relaxed` is not.
    """
    relaxed = gumbel_softmax_relaxed(logits, gumbel_noise, temperature)
    hard = F.one_hot(relaxed.argmax(dim=-1), relaxed.shape[-1]).to(relaxed.dtype)
    return hard + (relaxed - relaxed.detach())


def nucleus_sample(
    logits: torch.Tensor, uniforms: torch.Tensor, *, top_p: float, temperature: float = 1.0
) -> torch.Tensor:
    """One token id per row of logits [R, V] from the top-p nucleus of softmax(logits / temperature).

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (never empty); the token
    is read off its renormalised CDF at `uniforms` [R] in [0, 1). Inverse-CDF sampling from caller-supplied
    uniforms, instead of torch.multinomial on the global RNG (what HF generate does), makes each row's sample
    a function of its own draws: reproducible per sample id and independent of the batch it ran in.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    in_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
    cdf = (sorted_probs * in_nucleus).cumsum(dim=-1)
    targets = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    # Rounding can put a target at the very top of the CDF: stay inside the nucleus.
    last = in_nucleus.sum(dim=-1, keepdim=True) - 1
    position = torch.searchsorted(cdf, targets, right=True).clamp(max=last)
    return order.gather(1, position).squeeze(1)


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


@dataclass
class SampledCaptions:
    """Sampled captions as text (for the partner model) and as the exact token rows drawn (for log-probs).

    tokens has tokenize()'s layout (input_ids, attention_mask, labels) with image i's rows consecutive;
    labels cover only the sampled tokens (start token and prompt are ignored), up to the first end token.
    """

    captions: list[list[str]]
    tokens: dict[str, torch.Tensor]


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
            "input_ids": to_device(input_ids, self.device),
            "attention_mask": to_device(attention_mask, self.device),
            "labels": to_device(labels, self.device),
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
        token_losses = _token_nll(self.logits(pixels01, input_ids, attention_mask), labels, label_smoothing)
        token_counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
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
        prefix = self._prefix_ids(prompt)
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
        return self._texts_per_image(new_tokens, num_return_sequences)

    def _prefix_ids(self, prompt: str | None) -> torch.Tensor:
        """[start token, prompt tokens...]: what every generated caption continues."""
        prompt_ids = self.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        return torch.tensor(
            [self._decoding.start_token_id(self.model.config), *prompt_ids], device=self.device
        )

    def _texts_per_image(self, new_tokens: torch.Tensor, per_image: int) -> list[list[str]]:
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return [texts[start : start + per_image] for start in range(0, len(texts), per_image)]

    @property
    def vocab_size(self) -> int:
        """Rows of the decoder's word embeddings: the last dimension of logits and of soft-token probs."""
        return self._decoding.word_embeddings(self.model).num_embeddings

    def _image_states(self, pixels01: torch.Tensor, copies: int) -> torch.Tensor:
        """Encoder states per image, each repeated `copies` times for that many consecutive text rows."""
        states = self._decoding.image_states(self.model, self.preprocess(pixels01))
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
        logits, _ = self._decoding.text_logits(
            self.model,
            self._image_states(pixels01, copies),
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
        return -_token_nll(logits, labels).sum(dim=1)

    def gumbel_decode(
        self, pixels01: torch.Tensor, *, max_length: int, temperature: float, gumbel_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Free-running straight-through Gumbel-softmax decoding, differentiable through the whole chain.

        Each step's one-hot sample (gumbel_softmax_st of that step's logits and gumbel_noise[:, step]) is fed
        back as one-hot @ word embeddings, so a later position's gradient reaches every earlier step's logits.
        Returns probs [B, L, V] (position 0 the start token's one-hot, then the sampled one-hots; float32) and
        attention_mask [B, L] covering each row up to and including its first end token. L is max_length + 1,
        or less when every row has ended before. The cached steps run without gradient checkpointing, which
        would drop the cache (memory cost in _BlipDecoding.text_logits).
        """
        batch = pixels01.shape[0]
        vocab = self.vocab_size
        if tuple(gumbel_noise.shape) != (batch, max_length, vocab):
            raise ValueError(
                f"gumbel_noise shape {tuple(gumbel_noise.shape)} != (batch, max_length, vocab) "
                f"= {(batch, max_length, vocab)}"
            )
        embeddings = self._decoding.word_embeddings(self.model).weight
        end = self._decoding.end_token_id(self.model.config)
        image = self._image_states(pixels01, 1)
        start = self._prefix_ids(None).expand(batch, -1)
        logits, cache = self._decoding.text_logits(self.model, image, input_ids=start, use_cache=True)
        samples = [F.one_hot(start[:, 0], vocab).float()]
        in_caption = [torch.ones(batch, dtype=torch.bool, device=start.device)]
        ended = torch.zeros(batch, dtype=torch.bool, device=start.device)
        for step in range(max_length):
            noise = gumbel_noise[:, step].to(device=logits.device, dtype=torch.float32)
            sample = gumbel_softmax_st(logits[:, -1].float(), noise, temperature)
            samples.append(sample)
            in_caption.append(~ended)
            ended = ended | (sample.argmax(dim=-1) == end)
            if ended.all() or step == max_length - 1:
                break
            next_embeds = (sample.to(embeddings.dtype) @ embeddings)[:, None]
            logits, cache = self._decoding.text_logits(
                self.model, image, inputs_embeds=next_embeds, cache=cache, use_cache=True
            )
        return torch.stack(samples, dim=1), torch.stack(in_caption, dim=1).long()

    @torch.no_grad()
    def sample_captions(
        self,
        pixels01: torch.Tensor,
        *,
        uniforms: torch.Tensor,
        top_p: float,
        temperature: float = 1.0,
        prompt: str | None = None,
    ) -> SampledCaptions:
        """N nucleus-sampled captions per image, every choice read from uniforms [B, N, max_new_tokens].

        generate(do_sample=True, top_p, num_return_sequences=N, prompt) in distribution, but reproducible per
        sample (see nucleus_sample), and it returns the sampled token rows too: log-probabilities must be of
        exactly the tokens drawn, which re-tokenizing the decoded text need not give back.
        """
        if uniforms.ndim != 3 or uniforms.shape[0] != pixels01.shape[0]:
            raise ValueError(
                f"uniforms must be [B, N, max_new_tokens] with B = {pixels01.shape[0]} images, "
                f"got {tuple(uniforms.shape)}"
            )
        batch, copies, max_new_tokens = uniforms.shape
        config = self.model.config
        end, pad = self._decoding.end_token_id(config), config.text_config.pad_token_id
        prefix = self._prefix_ids(prompt).expand(batch * copies, -1)
        image = self._image_states(pixels01, copies)
        logits, cache = self._decoding.text_logits(self.model, image, input_ids=prefix, use_cache=True)
        row_uniforms = uniforms.reshape(batch * copies, max_new_tokens).to(self.device)
        ended = torch.zeros(batch * copies, dtype=torch.bool, device=self.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = nucleus_sample(logits[:, -1], row_uniforms[:, step], top_p=top_p, temperature=temperature)
            token = token.masked_fill(ended, pad)
            new_tokens.append(token)
            ended = ended | (token == end)
            if ended.all() or step == max_new_tokens - 1:
                break
            logits, cache = self._decoding.text_logits(
                self.model, image, input_ids=token[:, None], cache=cache, use_cache=True
            )
        new_ids = torch.stack(new_tokens, dim=1)
        is_end = (new_ids == end).long()
        in_caption = is_end.cumsum(dim=1) - is_end == 0
        input_ids = torch.cat([prefix, new_ids], dim=1)
        attention_mask = torch.cat([torch.ones_like(prefix), in_caption.long()], dim=1)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, : prefix.shape[1]] = IGNORE_INDEX
        return SampledCaptions(
            captions=self._texts_per_image(new_ids.masked_fill(~in_caption, pad), copies),
            tokens={"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
        )

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
