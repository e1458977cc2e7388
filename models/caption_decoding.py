"""Captioner decoding: beam search / HF sampling, nucleus sampling from given uniforms, Gumbel-softmax decoding.

Decoding is what validation, evaluation and the sampled cycle modes run on top of the training wrapper in
models/captioner.py, which mixes CaptionDecoding in. The model-family specifics (the prefix a caption
continues, how the text decoder is called on cached keys/values) are the family's spec in models/captioners/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cycletune.models.lockstep import finished_everywhere
from cycletune.models.modes import gradient_checkpointing_off

if TYPE_CHECKING:
    from cycletune.models.captioners.spec import CaptionerSpec

IGNORE_INDEX = -100


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


@dataclass
class SampledCaptions:
    """Sampled captions as text (for the partner model) and as the exact token rows drawn (for log-probs).

    tokens has Captioner.tokenize()'s layout (input_ids, attention_mask, labels) with image i's rows
    consecutive; labels cover only the sampled tokens (start token and prompt are ignored), up to the first
    end token.
    """

    captions: list[list[str]]
    tokens: dict[str, torch.Tensor]


class CaptionDecoding:
    """The decoding methods of models/captioner.py's Captioner, which this is mixed into.

    The annotations below are what they use of the Captioner.
    """

    model: torch.nn.Module
    max_length: int
    tokenizer: Any
    device: torch.device
    vocab_size: int
    spec: CaptionerSpec
    processor: Any
    prefix_ids: Callable[..., torch.Tensor]
    pad_token_id: int
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    _image_states: Callable[[torch.Tensor, int], torch.Tensor]

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
        prefix = self.prefix_ids(prompt).to(self.device)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        sampling |= {
            "eos_token_id": self.spec.end_token_id(self.processor, self.model.config),
            "pad_token_id": self.pad_token_id,
        }
        with gradient_checkpointing_off(self.model):  # keeps generate's cache (see text_logits)
            new_tokens = self.spec.generate(
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

    def _texts_per_image(self, new_tokens: torch.Tensor, per_image: int) -> list[list[str]]:
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return [texts[start : start + per_image] for start in range(0, len(texts), per_image)]

    def gumbel_decode(
        self, pixels01: torch.Tensor, *, max_length: int, temperature: float, gumbel_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Free-running straight-through Gumbel-softmax decoding, differentiable through the whole chain.

        Each step's one-hot sample (gumbel_softmax_st of that step's logits and gumbel_noise[:, step]) is fed
        back as one-hot @ word embeddings, so a later position's gradient reaches every earlier step's logits.
        Returns probs [B, L, V] (position 0 the prefix's last token's one-hot, as in Captioner.caption_part,
        then the sampled one-hots; float32) and attention_mask [B, L] covering each row up to and including its
        first end token. L is max_length + 1, or less when every row has ended before. The cached steps run
        without gradient checkpointing, which would drop the cache (memory cost in CaptionerSpec.text_logits).
        """
        batch = pixels01.shape[0]
        vocab = self.vocab_size
        if tuple(gumbel_noise.shape) != (batch, max_length, vocab):
            raise ValueError(
                f"gumbel_noise shape {tuple(gumbel_noise.shape)} != (batch, max_length, vocab) "
                f"= {(batch, max_length, vocab)}"
            )
        embeddings = self.spec.word_embedding_matrix(self.model)
        end = self.spec.end_token_id(self.processor, self.model.config)
        image = self._image_states(pixels01, 1)
        with gradient_checkpointing_off(self.model):  # the cache must survive (see text_logits)
            start = self.prefix_ids().to(self.device).expand(batch, -1)
            logits, cache = self.spec.text_logits(self.model, image, input_ids=start, use_cache=True)
            samples = [F.one_hot(start[:, -1], vocab).float()]
            in_caption = [torch.ones(batch, dtype=torch.bool, device=start.device)]
            ended = torch.zeros(batch, dtype=torch.bool, device=start.device)
            for step in range(max_length):
                noise = gumbel_noise[:, step].to(device=logits.device, dtype=torch.float32)
                sample = gumbel_softmax_st(logits[:, -1].float(), noise, temperature)
                samples.append(sample)
                in_caption.append(~ended)
                ended = ended | (sample.argmax(dim=-1) == end)
                if step == max_length - 1 or finished_everywhere(ended, self.model):
                    break
                next_embeds = (sample.to(embeddings.dtype) @ embeddings)[:, None]
                logits, cache = self.spec.text_logits(
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
        end, pad = self.spec.end_token_id(self.processor, config), self.pad_token_id
        prefix = self.prefix_ids(prompt).to(self.device).expand(batch * copies, -1)
        image = self._image_states(pixels01, copies)
        with gradient_checkpointing_off(self.model):  # the cache must survive (see text_logits)
            logits, cache = self.spec.text_logits(self.model, image, input_ids=prefix, use_cache=True)
            row_uniforms = uniforms.reshape(batch * copies, max_new_tokens).to(self.device)
            ended = torch.zeros(batch * copies, dtype=torch.bool, device=self.device)
            new_tokens = []
            for step in range(max_new_tokens):
                token = nucleus_sample(
                    logits[:, -1], row_uniforms[:, step], top_p=top_p, temperature=temperature
                )
                token = token.masked_fill(ended, pad)
                new_tokens.append(token)
                ended = ended | (token == end)
                if step == max_new_tokens - 1 or finished_everywhere(ended, self.model):
                    break
                logits, cache = self.spec.text_logits(
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
