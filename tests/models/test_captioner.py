"""Captioner wrapper on the tiny BLIP: preprocessing, tokenization, per-sample loss, generation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cycletune.models.caption_decoding import IGNORE_INDEX
from cycletune.models.captioner import Captioner

CAPTIONS = ["a small red circle", "there is a big blue square at the top left of the picture"]


def _smooth_image(size: int) -> torch.Tensor:
    """A photo-like 8-bit image (smooth gradients): 8-bit and float bicubic agree closely on those."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    channels = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx * yy)], dim=-1)
    return (channels * 255).round().to(torch.uint8)


def test_loads_with_processor_settings(tiny_models) -> None:
    captioner = Captioner.from_pretrained(
        str(tiny_models.captioner), torch_dtype=torch.bfloat16, max_length=12
    )
    assert captioner.image_size == 32
    assert captioner.max_length == 12
    assert captioner.dtype == torch.bfloat16
    assert captioner.device == torch.device("cpu")
    assert captioner.tokenizer is captioner.processor.tokenizer
    assert torch.allclose(
        captioner.pixel_mean.flatten().float(), torch.tensor(captioner.processor.image_processor.image_mean)
    )
    batch = captioner.tokenize(CAPTIONS)
    losses = captioner.caption_loss(torch.rand(2, 3, 32, 32), **batch)
    assert losses.dtype == torch.float32 and losses.shape == (2,)


def test_unsupported_model_family_is_named(tmp_path) -> None:
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'paligemma' is not supported"):
        Captioner.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("source_size", [20, 32, 48])
def test_preprocess_matches_hf_processor(captioner, source_size) -> None:
    image = _smooth_image(source_size)
    expected = captioner.processor(images=Image.fromarray(image.numpy()), return_tensors="pt")["pixel_values"]
    pixels01 = image.permute(2, 0, 1)[None].float() / 255
    actual = captioner.preprocess(pixels01)
    assert actual.shape == expected.shape == (1, 3, 32, 32)
    # The processor resizes 8-bit pixels (rounding between its two separable passes); we resize floats.
    tolerance = 1e-5 if source_size == 32 else 0.03
    assert (actual - expected).abs().max() < tolerance


def test_preprocess_is_differentiable_and_checks_shape(captioner) -> None:
    pixels01 = torch.rand(2, 3, 40, 40, requires_grad=True)
    captioner.preprocess(pixels01).square().sum().backward()
    assert pixels01.grad is not None and pixels01.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        captioner.preprocess(torch.rand(3, 32, 32))


def test_tokenize_starts_with_generation_start_token_and_masks_labels(captioner) -> None:
    batch = captioner.tokenize(CAPTIONS)
    tokenizer = captioner.tokenizer
    start = tokenizer.convert_tokens_to_ids("[DEC]")
    assert start == captioner.model.config.text_config.bos_token_id
    assert (batch["input_ids"][:, 0] == start).all()
    plain = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    assert (plain["input_ids"][:, 0] == tokenizer.cls_token_id).all()  # what the HF processor alone gives
    assert torch.equal(batch["input_ids"][:, 1:], plain["input_ids"][:, 1:])
    padding = batch["attention_mask"] == 0
    assert padding[0].any() and not padding[1].any()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()
    kept = ~padding
    kept[:, 0] = False
    assert torch.equal(batch["labels"][kept], batch["input_ids"][kept])

    captioner.max_length = 5
    truncated = captioner.tokenize(CAPTIONS)["input_ids"]
    assert truncated.shape[1] == 5 and truncated[1, -1] == tokenizer.sep_token_id
    with pytest.raises(ValueError, match="list of caption strings"):
        captioner.tokenize([])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_forward_is_per_sample_cross_entropy(captioner, label_smoothing) -> None:
    torch.manual_seed(0)
    pixels01 = torch.rand(2, 3, 32, 32)
    batch = captioner.tokenize(CAPTIONS)
    losses = captioner.caption_loss(pixels01, **batch, label_smoothing=label_smoothing)

    logits = captioner.logits(pixels01, batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (*batch["input_ids"].shape, len(captioner.tokenizer))
    for sample, loss in enumerate(losses):
        positions = [i for i in range(logits.shape[1] - 1) if batch["labels"][sample, i + 1] != IGNORE_INDEX]
        log_probs = torch.log_softmax(logits[sample, positions], dim=-1)
        targets = batch["labels"][sample, [i + 1 for i in positions]]
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
        expected = ((1 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)).mean()
        assert torch.allclose(loss, expected, atol=1e-5)

    for sample, caption in enumerate(CAPTIONS):  # padding in a batch does not change a sample's loss
        alone = captioner.caption_loss(
            pixels01[sample : sample + 1], **captioner.tokenize([caption]), label_smoothing=label_smoothing
        )
        assert torch.allclose(alone[0], losses[sample], atol=1e-5)


def test_greedy_generation_starts_from_the_training_start_token(captioner) -> None:
    """generate() must decode from the token that tokenize() trains on; a random model tells the two apart."""
    torch.manual_seed(0)
    pixels01 = torch.rand(1, 3, 32, 32)
    ids = captioner.tokenize(["anything"])["input_ids"][:, :1]
    for _ in range(6):  # greedy decoding by hand through the teacher-forced logits
        next_id = captioner.logits(pixels01, ids, torch.ones_like(ids))[:, -1].argmax(dim=-1, keepdim=True)
        if next_id.item() == captioner.tokenizer.sep_token_id:
            break
        ids = torch.cat([ids, next_id], dim=1)
    expected = captioner.tokenizer.decode(ids[0, 1:], skip_special_tokens=True)
    assert captioner.generate(pixels01, max_new_tokens=6) == [[expected]]


def test_overfit_one_pair_then_generation_reproduces_it(captioner) -> None:
    torch.manual_seed(0)
    pixels01 = torch.rand(1, 3, 32, 32)
    caption = "a picture of a small red circle at the top left"
    batch = captioner.tokenize([caption])
    optimizer = torch.optim.Adam(captioner.parameters(), lr=1e-2)
    first_loss = None
    for _ in range(150):
        loss = captioner.caption_loss(pixels01, **batch).mean()
        first_loss = first_loss if first_loss is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first_loss
    assert captioner.generate(pixels01) == [[caption]]
    assert captioner.generate(pixels01, num_beams=2, prompt="a picture of ") == [
        ["a small red circle at the top left"]
    ]


def test_generate_returns_n_captions_per_image(captioner) -> None:
    pixels01 = torch.rand(2, 3, 32, 32)
    beams = captioner.generate(pixels01, num_beams=3, num_return_sequences=2, max_new_tokens=4)
    torch.manual_seed(0)
    samples = captioner.generate(
        pixels01,
        do_sample=True,
        top_p=0.9,
        temperature=0.7,
        num_return_sequences=3,
        max_new_tokens=4,
        prompt="a picture of",
    )
    for captions, count in ((beams, 2), (samples, 3)):
        assert len(captions) == 2
        assert all(
            len(per_image) == count and all(isinstance(c, str) for c in per_image) for per_image in captions
        )
    assert pixels01.requires_grad is False
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        captioner.generate(pixels01, num_return_sequences=2)
