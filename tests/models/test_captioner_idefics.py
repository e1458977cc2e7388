"""The IDEFICS family (models/captioners/idefics.py) on its tiny model: the Llama tokenizer with IDEFICS' image
tokens, IdeficsProcessor's layout and image_attention_mask, the gated cross-attention decoder on cached image
states, the two-table word embedding, generation and LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import IdeficsForVisionText2Text, LlamaTokenizer

from cycletune.models.captioner import Captioner
from cycletune.models.captioners.idefics import (
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    IdeficsSpec,
    image_attention_mask,
)
from cycletune.models.lora import add_captioner_lora
from cycletune.models.modes import gradient_checkpointing_off
from cycletune.train.config import load_config, save_config

CAPTIONS = ["a red circle", "the small blue square in the center"]
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "idefics_sd15_coco.yaml"


@pytest.fixture(scope="module")
def tiny_idefics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return IdeficsSpec.save_tiny(tmp_path_factory.mktemp("idefics"), seed=0)


@pytest.fixture
def idefics(tiny_idefics: Path) -> Captioner:
    return Captioner.from_pretrained(str(tiny_idefics), max_length=12).eval()


@pytest.fixture(scope="module")
def decisive_idefics(tiny_idefics: Path) -> Captioner:
    """Matrices redrawn at ten times the init scale, so that greedy captions differ from image to image and a
    decoding that mixed images or positions up would show."""
    captioner = Captioner.from_pretrained(str(tiny_idefics)).eval()
    draws = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in captioner.model.named_parameters():
            if param.ndim == 2 and "vision_model.embeddings" not in name:
                param.copy_(torch.randn(param.shape, generator=draws) * 0.2)
    return captioner


def _image(seed: int) -> tuple[torch.Tensor, Image.Image]:
    """An 8-bit random image, as pixels01 and as the PIL image the processor takes."""
    image8 = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 255).round()
    image8 = image8.to(torch.uint8)
    return image8.float() / 255, Image.fromarray(image8.permute(1, 2, 0).numpy())


def test_the_tiny_tokenizer_is_llamas_sentencepiece_bpe_with_idefics_image_tokens(idefics: Captioner) -> None:
    tokenizer, config = idefics.tokenizer, idefics.model.config
    assert isinstance(tokenizer, LlamaTokenizer)
    assert isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace)
    # "▁" starts every word, the text's first included; characters outside the vocabulary fall back to bytes.
    assert tokenizer.tokenize("a red circle") == ["▁a", "▁red", "▁circle"]
    assert tokenizer.tokenize("a Ω") == ["▁a", "▁", "<0xCE>", "<0xA9>"]
    assert tokenizer.decode(tokenizer("a Ω", add_special_tokens=False)["input_ids"]) == "a Ω"
    specials = ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == specials
    assert tokenizer.convert_tokens_to_ids(list(specials)) == [0, 1, 2]
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    # The image tokens follow the Llama vocabulary: the two rows of IDEFICS' additional embedding table.
    image_ids = tokenizer.convert_tokens_to_ids([FAKE_IMAGE_TOKEN, IMAGE_TOKEN])
    assert image_ids == [config.vocab_size, config.vocab_size + 1] and config.additional_vocab_size == 2
    assert set(image_ids) <= set(tokenizer.all_special_ids)
    assert tokenizer.tokenize(f"a{IMAGE_TOKEN}red") == ["▁a", IMAGE_TOKEN, "red"]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert idefics.model.generation_config.eos_token_id == idefics.spec.end_token_id(
        idefics.processor, config
    )
    assert len(tokenizer) == idefics.vocab_size


def test_rows_and_image_attention_mask_match_idefics_own_processor(idefics: Captioner) -> None:
    """IdeficsProcessor on [image, prompt] and on [image, prompt + caption + </s>]: the same ids, the same
    image_attention_mask (the image read from <image> on), the same pixel values."""
    pixels01, image = _image(0)
    for prompt in ("Caption:", "", "User: describe it.\nAssistant:"):
        inputs = idefics.processor(images=[image], text=[prompt], return_tensors="pt")
        prefix = idefics.prefix_ids(prompt)
        assert inputs["input_ids"][0].tolist() == prefix.tolist()
        assert idefics.tokenizer.convert_ids_to_tokens(prefix[:4].tolist()) == [
            "<s>", FAKE_IMAGE_TOKEN, IMAGE_TOKEN, FAKE_IMAGE_TOKEN,
        ]  # fmt: skip
    assert idefics.prompt == IdeficsSpec.default_prompt == "Caption:"

    for caption in CAPTIONS:
        row = idefics.tokenize([caption])["input_ids"]
        text = f"{idefics.prompt} {caption}"
        inputs = idefics.processor(images=[image], text=[text], add_eos_token=True, return_tensors="pt")
        assert inputs["input_ids"].tolist() == row.tolist()
        mask = image_attention_mask(1, row.shape[1], 0, row.device)
        assert torch.equal(mask, inputs["image_attention_mask"].long())
        # A cached step continues the mask by position.
        assert torch.equal(image_attention_mask(1, 2, row.shape[1] - 2, row.device), mask[:, -2:])
    assert torch.allclose(idefics.preprocess(pixels01[None]), inputs["pixel_values"][:, 0], atol=1e-5)


def test_logits_equal_the_models_forward_on_pixels_and_depend_on_the_image(idefics: Captioner) -> None:
    """The spec's precomputed image states give what forward() computes from pixel_values, and with the gates
    open from init (alpha_initializer "ones") the image changes the caption logits of a random model."""
    pixels01 = torch.stack([_image(0)[0], _image(1)[0]])
    tokens = idefics.tokenize(CAPTIONS)
    rows, length = tokens["input_ids"].shape
    forward = idefics.model(
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
        pixel_values=idefics.preprocess(pixels01)[:, None],
        image_attention_mask=image_attention_mask(rows, length, 0, pixels01.device),
    ).logits
    logits = idefics.logits(pixels01, tokens["input_ids"], tokens["attention_mask"])
    assert logits.shape == (rows, length, idefics.vocab_size)
    assert torch.allclose(logits, forward, atol=1e-5)
    swapped = idefics.logits(pixels01.flip(0), tokens["input_ids"], tokens["attention_mask"])
    caption = slice(idefics.caption_start, None)
    assert not torch.allclose(swapped[:, caption], logits[:, caption], atol=1e-4)
    # <s> and the opening fake token read no image, as in the processor's mask.
    assert torch.allclose(swapped[:, :2], logits[:, :2], atol=1e-6)


def test_solid_colours_give_distinct_image_states_with_gradients_to_the_pixels(idefics: Captioner) -> None:
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9]])
    pixels01 = colours[:, :, None, None].expand(-1, -1, 32, 32).clone().requires_grad_(True)
    states = idefics.spec.image_states(idefics.model, idefics.preprocess(pixels01))
    assert states.shape == (3, idefics.model.config.perceiver_config.resampler_n_latents, 32)
    gaps = torch.cdist(states.flatten(1), states.flatten(1))
    assert gaps[~torch.eye(3, dtype=torch.bool)].min() > 1e-2
    states.square().sum().backward()
    assert pixels01.grad is not None and pixels01.grad.abs().sum() > 0


def test_the_joined_embedding_reads_both_tables_in_token_id_order(idefics: Captioner) -> None:
    model = idefics.model
    matrix = idefics.spec.word_embedding_matrix(model)
    ids = torch.tensor([[0, 5, 300, model.config.vocab_size, model.config.vocab_size + 1]])
    one_hot = F.one_hot(ids, matrix.shape[0]).float()
    assert torch.allclose(one_hot @ matrix, model.get_input_embeddings()(ids))
    (one_hot @ matrix).sum().backward()
    table = model.get_input_embeddings()
    assert table.weight.grad is not None and table.additional_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("feed", ["input_ids", "inputs_embeds"])
def test_cached_steps_give_the_teacher_forced_logits_and_gradients(tiny_idefics: Path, feed: str) -> None:
    """Train mode with gradient checkpointing on, as the sampled cycle modes decode: the cache must survive,
    and each cached step must read the image (image_attention_mask continued by position)."""
    model = IdeficsForVisionText2Text.from_pretrained(tiny_idefics)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    captioner = Captioner(model, Captioner.from_pretrained(str(tiny_idefics)).processor).train()
    spec = captioner.spec
    pixels01 = torch.stack([_image(2)[0], _image(3)[0]]).requires_grad_(True)
    input_ids = captioner.tokenize(CAPTIONS)["input_ids"]
    soft_tokens = F.one_hot(input_ids, captioner.vocab_size).float().requires_grad_(True)
    image = spec.image_states(model, captioner.preprocess(pixels01))
    teacher_forced, _ = spec.text_logits(model, image, input_ids=input_ids)

    start = len(captioner.prefix_ids())
    with gradient_checkpointing_off(model):  # as models/caption_decoding.py makes cached calls
        logits, cache = spec.text_logits(model, image, input_ids=input_ids[:, :start], use_cache=True)
        steps = [logits]
        for position in range(start, input_ids.shape[1]):
            if feed == "input_ids":
                token = {"input_ids": input_ids[:, position : position + 1]}
            else:
                token = {
                    "inputs_embeds": soft_tokens[:, position : position + 1]
                    @ spec.word_embedding_matrix(model)
                }
            logits, cache = spec.text_logits(model, image, **token, cache=cache, use_cache=True)
            steps.append(logits)
    assert cache.get_seq_length() == input_ids.shape[1]
    assert torch.allclose(torch.cat(steps, dim=1), teacher_forced, atol=1e-5)

    steps[-1].logsumexp(dim=-1).sum().backward()
    assert pixels01.grad is not None and pixels01.grad.abs().sum() > 0
    if feed == "inputs_embeds":
        assert soft_tokens.grad is not None and soft_tokens.grad[:, start:].abs().sum() > 0


def test_greedy_generate_and_the_wrappers_argmax_decoding_agree(decisive_idefics: Captioner) -> None:
    """HF generate (its own cache and image_attention_mask updates, images from pixel_values) and
    sample_captions on text_logits, argmax by a one-token nucleus, pick the same tokens; beams and sampling
    return only new tokens."""
    captioner = decisive_idefics
    pixels01 = torch.stack([_image(seed)[0] for seed in (4, 5, 6)])
    uniforms = torch.rand(3, 1, 6, generator=torch.Generator().manual_seed(0))
    for prompt in ("", "Caption:"):
        greedy = captioner.generate(pixels01, max_new_tokens=6, prompt=prompt)
        argmax = captioner.sample_captions(pixels01, uniforms=uniforms, top_p=1e-6, prompt=prompt)
        assert greedy == argmax.captions
        assert len({options[0] for options in greedy}) > 1, "different images should give different captions"
    prefix = captioner.prefix_ids().expand(3, -1)
    pixel_values = captioner.preprocess(pixels01)
    new_tokens = captioner.spec.generate(captioner.model, pixel_values, prefix, max_new_tokens=6)
    assert torch.equal(new_tokens, argmax.tokens["input_ids"][:, prefix.shape[1] :])
    beams = captioner.spec.generate(
        captioner.model, pixel_values, prefix, num_beams=3, num_return_sequences=2, max_new_tokens=4
    )
    assert beams.shape[0] == 6 and beams.shape[1] <= 4
    assert len(captioner.generate(pixels01, do_sample=True, top_p=0.9, num_return_sequences=2)[0]) == 2


def test_lora_targets_only_the_language_sides_attention(tiny_idefics: Path) -> None:
    captioner = Captioner.from_pretrained(str(tiny_idefics))
    add_captioner_lora(captioner, rank=2, alpha=2)
    adapted = sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
        for name, _ in captioner.model.named_modules()
        if name.endswith("lora_A.default")
    )
    config = captioner.model.config
    expected = sorted(
        f"model.{block}.{index}.{attention}.{projection}_proj"
        for block, attention, count in (
            ("layers", "self_attn", config.num_hidden_layers),
            (
                "gated_cross_attn_layers",
                "cross_attn",
                config.num_hidden_layers // config.cross_layer_interval,
            ),
        )
        for index in range(count)
        for projection in "qkvo"
    )
    assert adapted == expected
    # The vision tower and the perceiver have q/k/v projections of their own; none is adapted.
    assert any(
        ".vision_model." in name and name.endswith("q_proj") for name, _ in captioner.model.named_modules()
    )
    assert any(".perceiver_resampler." in name for name, _ in captioner.model.named_modules())


def test_the_shipped_idefics_config_validates_with_the_familys_targets_and_prompt(tmp_path: Path) -> None:
    config = load_config(SHIPPED_CONFIG)
    assert config.captioner.pretrained_model_name_or_path == "HuggingFaceM4/idefics-9b"
    assert config.captioner.lora.target_modules == IdeficsSpec.lora_targets
    assert config.captioner.prompt == IdeficsSpec.default_prompt
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
