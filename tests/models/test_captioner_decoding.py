"""Captioner decoding additions: Gumbel-softmax, nucleus sampling from given uniforms, free-running decoding,
sequence log-probabilities and the base-model switch, on the tiny BLIP."""

from __future__ import annotations

import pytest
import torch

from cycletune.models.caption_decoding import (
    IGNORE_INDEX,
    gumbel_softmax_relaxed,
    gumbel_softmax_st,
    nucleus_sample,
)
from cycletune.models.captioner import Captioner
from cycletune.models.lora import add_captioner_lora, prepare_trainable

MAX_NEW_TOKENS = 6


def _end_early(captioner: Captioner, bias: float = 4.0) -> int:
    """Raise the end token's output bias so that some, not all, random-model captions end within a few tokens."""
    end = captioner.tokenizer.sep_token_id
    with torch.no_grad():
        captioner.model.text_decoder.cls.predictions.bias[end] += bias
    return end


def _pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_gumbel_softmax_relaxation_passes_gradcheck() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    noise = -torch.empty(3, 7, dtype=torch.float64).exponential_(generator=generator).log()
    assert torch.autograd.gradcheck(lambda x: gumbel_softmax_relaxed(x, noise, 0.7), (logits,))


def test_straight_through_forward_is_the_exact_gumbel_max_one_hot_and_backward_the_relaxed_gradient() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    noise = -torch.empty(4, 9, dtype=torch.float64).exponential_(generator=generator).log()
    upstream = torch.randn(4, 9, dtype=torch.float64, generator=generator)

    hard = gumbel_softmax_st(logits, noise, 0.5)
    expected = torch.nn.functional.one_hot((logits + noise).argmax(dim=-1), 9).to(torch.float64)
    assert torch.equal(hard, expected)  # exactly 0 / 1, not 1 - 1e-17
    (hard_grad,) = torch.autograd.grad((hard * upstream).sum(), logits)
    (relaxed_grad,) = torch.autograd.grad(
        (gumbel_softmax_relaxed(logits, noise, 0.5) * upstream).sum(), logits
    )
    assert torch.equal(hard_grad, relaxed_grad)
    assert hard_grad.abs().sum() > 0


def test_nucleus_sample_reads_the_renormalised_nucleus_cdf() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(2000, -1)
    uniforms = (torch.arange(2000) + 0.5) / 2000  # an even grid: the counts are the CDF, exactly
    # top_p 0.75: tokens 1 (0.5) and 3 (0.3) reach it; renormalised 0.625 / 0.375.
    counts = torch.bincount(nucleus_sample(logits, uniforms, top_p=0.75), minlength=4)
    assert counts.tolist() == [0, 1250, 0, 750]
    counts = torch.bincount(nucleus_sample(logits, uniforms, top_p=1.0), minlength=4)
    assert counts.tolist() == [100, 1000, 300, 600]
    # A tiny nucleus is the most likely token; a high temperature flattens the distribution.
    assert (nucleus_sample(logits, uniforms, top_p=1e-6) == 1).all()
    flat = torch.bincount(nucleus_sample(logits, uniforms, top_p=1.0, temperature=1e6), minlength=4)
    assert (flat - 500).abs().max() <= 1
    with pytest.raises(ValueError, match="top_p"):
        nucleus_sample(logits, uniforms, top_p=0.0)


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_sampling_with_a_tiny_nucleus_is_greedy_generation(captioner, prompt) -> None:
    """The cached decoding loop (positions, prompt prefix, image states) agrees with HF generate."""
    _end_early(captioner, bias=2.0)
    pixels01 = _pixels(3)
    uniforms = torch.rand(3, 2, MAX_NEW_TOKENS)
    sampled = captioner.sample_captions(pixels01, uniforms=uniforms, top_p=1e-6, prompt=prompt)
    greedy = captioner.generate(pixels01, max_new_tokens=MAX_NEW_TOKENS, prompt=prompt)
    assert sampled.captions == [[captions[0]] * 2 for captions in greedy]
    prefix_length = 1 + (
        0 if prompt is None else len(captioner.tokenizer(prompt, add_special_tokens=False).input_ids)
    )
    assert (sampled.tokens["labels"][:, :prefix_length] == IGNORE_INDEX).all()
    assert sampled.tokens["input_ids"].shape[0] == 6


def test_sampled_token_rows_end_at_the_first_end_token(captioner) -> None:
    end = _end_early(captioner)
    pixels01 = _pixels(2)
    sampled = captioner.sample_captions(
        pixels01,
        uniforms=torch.rand(2, 4, MAX_NEW_TOKENS, generator=torch.Generator().manual_seed(0)),
        top_p=0.9,
    )
    ids, mask, labels = (sampled.tokens[name] for name in ("input_ids", "attention_mask", "labels"))
    ended = (ids == end).any(dim=1)
    assert ended.any() and not ended.all(), "the test needs rows that end and rows that run out of tokens"
    texts = [caption for per_image in sampled.captions for caption in per_image]
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()
        if ended[row]:
            assert ids[row, length - 1] == end and (ids[row, : length - 1] != end).all()
        assert (labels[row, length:] == IGNORE_INDEX).all() and labels[row, 0] == IGNORE_INDEX
        assert torch.equal(labels[row, 1:length], ids[row, 1:length])
        assert texts[row] == captioner.tokenizer.decode(ids[row, 1:length], skip_special_tokens=True).strip()

    # The log-probability is of exactly those tokens, from the teacher-forced logits.
    logprobs = captioner.sequence_logprobs(pixels01, **sampled.tokens)
    logits = captioner.logits(pixels01.repeat_interleave(4, dim=0), ids, mask).float().log_softmax(dim=-1)
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        expected = logits[row, torch.arange(length - 1), ids[row, 1:length]].sum()
        assert torch.allclose(logprobs[row], expected, atol=1e-5)


def test_same_uniforms_same_samples_whatever_the_batch(captioner) -> None:
    pixels01 = _pixels(3)
    uniforms = torch.rand(3, 2, MAX_NEW_TOKENS, generator=torch.Generator().manual_seed(3))
    together = captioner.sample_captions(pixels01, uniforms=uniforms, top_p=0.9).captions
    alone = captioner.sample_captions(pixels01[2:], uniforms=uniforms[2:], top_p=0.9).captions
    assert alone[0] == together[2]
    with pytest.raises(ValueError, match=r"uniforms must be \[B, N, max_new_tokens\]"):
        captioner.sample_captions(pixels01, uniforms=uniforms[:2], top_p=0.9)


def test_gumbel_decode_with_zero_noise_is_greedy_and_masks_after_the_end(captioner) -> None:
    end = _end_early(captioner, bias=2.0)
    pixels01 = _pixels(3)
    noise = torch.zeros(3, MAX_NEW_TOKENS, captioner.vocab_size)
    probs, mask = captioner.gumbel_decode(
        pixels01, max_length=MAX_NEW_TOKENS, temperature=1.0, gumbel_noise=noise
    )
    assert probs.dtype == torch.float32 and probs.shape[0] == 3 and probs.shape[1] <= MAX_NEW_TOKENS + 1
    assert torch.equal(probs, torch.nn.functional.one_hot(probs.argmax(dim=-1), captioner.vocab_size).float())
    ids = probs.argmax(dim=-1)
    assert (ids[:, 0] == captioner.model.config.text_config.bos_token_id).all()
    lengths = mask.sum(dim=1)
    texts = [
        captioner.tokenizer.decode(row[1:length], skip_special_tokens=True)
        for row, length in zip(ids, lengths, strict=True)
    ]
    assert [[text.strip()] for text in texts] == captioner.generate(pixels01, max_new_tokens=MAX_NEW_TOKENS)
    for row, length in zip(ids, lengths, strict=True):
        assert mask.shape == ids.shape and (row[1 : length - 1] != end).all()
        assert row[length - 1] == end or length == ids.shape[1]
    assert (ids == end).any(), "the test needs a caption that ends"
    with pytest.raises(ValueError, match="gumbel_noise shape"):
        captioner.gumbel_decode(pixels01, max_length=MAX_NEW_TOKENS + 1, temperature=1.0, gumbel_noise=noise)


def test_gumbel_decode_carries_gradient_from_late_positions_to_early_steps(captioner) -> None:
    """Each one-hot is fed back as one-hot @ embeddings, so position t's loss reaches step 0's sample."""
    pixels01 = _pixels(2)
    noise = (
        -torch.empty(2, MAX_NEW_TOKENS, captioner.vocab_size)
        .exponential_(generator=torch.Generator().manual_seed(0))
        .log()
    )
    noise[..., captioner.tokenizer.sep_token_id] = -1e4  # no caption ends: every step is decoded
    noise.requires_grad_(True)
    probs, mask = captioner.gumbel_decode(
        pixels01, max_length=MAX_NEW_TOKENS, temperature=0.5, gumbel_noise=noise
    )
    assert probs.shape[1] == MAX_NEW_TOKENS + 1 and mask.all()
    weights = torch.randn(probs.shape[-1], generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((probs[:, -1] @ weights).sum(), noise)
    assert grad[:, 0].abs().sum() > 0 and grad[:, -1].abs().sum() > 0 and torch.isfinite(grad).all()


def test_sequence_logprobs_match_caption_loss_and_reuse_image_states(captioner) -> None:
    pixels01 = _pixels(2)
    tokens = captioner.tokenize(["a small red circle", "there is a big blue square on the left"])
    counts = (tokens["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    expected = -captioner.caption_loss(pixels01, **tokens) * counts
    assert torch.allclose(captioner.sequence_logprobs(pixels01, **tokens), expected, atol=1e-5)

    # Two rows per image: the same as repeating each image for its rows.
    repeated = {name: value.repeat_interleave(2, dim=0) for name, value in tokens.items()}
    shared = captioner.sequence_logprobs(pixels01, **repeated)
    assert torch.allclose(shared, expected.repeat_interleave(2), atol=1e-5)
    with pytest.raises(ValueError, match="do not split evenly over 2 images"):
        captioner.sequence_logprobs(pixels01, **{name: value[:3] for name, value in repeated.items()})


def test_adapters_disabled_runs_the_base_model(captioner) -> None:
    pixels01 = _pixels(2)
    tokens = captioner.tokenize(["a small red circle", "a big blue square"])
    before = captioner.sequence_logprobs(pixels01, **tokens)
    assert not captioner.has_adapters
    with pytest.raises(ValueError, match="no LoRA adapters"), captioner.adapters_disabled():
        pass

    add_captioner_lora(captioner, rank=4, alpha=8.0)
    names = prepare_trainable(captioner, train_mode="lora")
    params = dict(captioner.named_parameters())
    with torch.no_grad():
        for name in names:  # stand-in for training: LoRA B starts at zero
            params[name].add_(
                0.1 * torch.randn(params[name].shape, generator=torch.Generator().manual_seed(0))
            )
    adapted = captioner.sequence_logprobs(pixels01, **tokens)
    with captioner.adapters_disabled():
        base = captioner.sequence_logprobs(pixels01, **tokens)
    assert captioner.has_adapters
    assert torch.allclose(base, before, atol=1e-5)
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert torch.allclose(captioner.sequence_logprobs(pixels01, **tokens), adapted)  # switched back on
