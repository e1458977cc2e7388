"""The BLIP-2 (OPT) family (models/captioners/blip2.py) on its tiny model: OPT's tokenizer, Blip2Processor's
placeholder layout, the decoder on projected queries (KV cache, gradients), generation, LoRA targets, the
refusal of checkpoints it cannot drive, and configs/blip2_sd15_coco.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import Blip2Config, Blip2ForConditionalGeneration, GPT2Tokenizer

from cycletune.models.captioner import Captioner
from cycletune.models.captioners import spec_for
from cycletune.models.captioners.blip2 import Blip2Spec
from cycletune.models.lora import add_captioner_lora
from cycletune.models.modes import gradient_checkpointing_off
from cycletune.train.config import load_config, save_config

PROMPT = "a picture of"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Blip2Spec.save_tiny(tmp_path_factory.mktemp("blip2"), seed=0)


@pytest.fixture
def blip2(tiny_blip2: Path) -> Captioner:
    return Captioner.from_pretrained(str(tiny_blip2), max_length=8).eval()


@pytest.fixture(scope="module")
def opinionated_blip2(tiny_blip2: Path) -> Captioner:
    """Weight matrices at ten times the init scale: at the init scale every image's greedy caption is the same
    repeated token, so a decoding that dropped or mixed up the images would not show."""
    captioner = Captioner.from_pretrained(str(tiny_blip2)).eval()
    draws = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in captioner.model.named_parameters():
            if param.ndim == 2 and not name.startswith("vision_model.embeddings"):
                param.copy_(torch.randn(param.shape, generator=draws) * 0.2)
    return captioner


def test_the_tiny_tokenizer_is_opts_byte_level_bpe_with_its_specials(blip2: Captioner) -> None:
    tokenizer, config = blip2.tokenizer, blip2.model.config
    assert isinstance(tokenizer, GPT2Tokenizer)
    assert isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
    # A word after a space starts with "Ġ"; the text's first word does not.
    assert tokenizer.tokenize("a red zebras") == ["a", "Ġred", "Ġzebra", "s"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>", "<pad>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (1, 2)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    # Blip2Processor's placeholder: one special token, which decoding skips.
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [config.image_token_index]
    assert tokenizer.decode([config.image_token_index], skip_special_tokens=True) == ""
    assert tokenizer.decode([config.text_config.eos_token_id]) == "\n"
    assert (config.text_config.bos_token_id, config.text_config.pad_token_id) == (2, 1)


def test_the_prefix_and_pixels_match_blip2s_own_processor(blip2: Captioner) -> None:
    """Blip2Processor: num_query_tokens placeholders, then "</s>" and the prompt; captions continue that."""
    torch.manual_seed(0)
    image8 = (torch.rand(3, 32, 32) * 255).round().to(torch.uint8)
    image = Image.fromarray(image8.permute(1, 2, 0).numpy())
    for prompt in (PROMPT, None):
        inputs = blip2.processor(images=image, text=prompt or "", return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == blip2.prefix_ids(prompt).tolist()
    placeholders = [blip2.model.config.image_token_index] * blip2.model.config.num_query_tokens
    assert blip2.prefix_ids().tolist() == [*placeholders, blip2.tokenizer.bos_token_id]
    row = blip2.tokenize(["a red circle"])["input_ids"][0].tolist()
    caption = blip2.tokenizer.convert_ids_to_tokens(row[blip2.caption_start + 1 :])
    assert caption == ["a", "Ġred", "Ġcircle", "Ċ"]
    prompted = Captioner(blip2.model, blip2.processor, max_length=8, prompt=PROMPT)
    row = prompted.tokenize(["a red circle"])["input_ids"][0].tolist()
    as_text = blip2.processor(images=image, text=f"{PROMPT} a red circle", return_tensors="pt")["input_ids"][
        0
    ]
    assert row == [*as_text.tolist(), blip2.model.config.text_config.eos_token_id]  # "Ġa" after the prompt
    pixel_values = blip2.preprocess(image8[None].float() / 255)
    assert torch.allclose(pixel_values, inputs["pixel_values"], atol=1e-5)


def test_logits_equal_the_models_forward(blip2: Captioner) -> None:
    """The spec fills the placeholders by position; forward() by their id: the same rows either way."""
    torch.manual_seed(0)
    pixels01 = torch.rand(2, 3, 32, 32)
    tokens = blip2.tokenize(["a red circle", "the small blue square in the center"])
    forward = blip2.model(
        pixel_values=blip2.preprocess(pixels01),
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
    ).logits
    logits = blip2.logits(pixels01, tokens["input_ids"], tokens["attention_mask"])
    assert logits.shape == forward.shape
    assert torch.allclose(logits, forward, atol=1e-5)
    other_image = blip2.logits(pixels01.flip(0), tokens["input_ids"], tokens["attention_mask"])
    assert not torch.allclose(other_image, logits, atol=1e-3), "the image states must reach the logits"


@pytest.mark.parametrize("feed", ["input_ids", "inputs_embeds"])
def test_cached_steps_give_the_teacher_forced_logits_and_gradients(tiny_blip2: Path, feed: str) -> None:
    """Train mode with gradient checkpointing on, as the sampled cycle modes decode: the cache must survive."""
    base = Captioner.from_pretrained(str(tiny_blip2))
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    captioner = Captioner(model, base.processor).train()
    spec = captioner.spec
    torch.manual_seed(0)
    pixels01 = torch.rand(2, 3, 32, 32, requires_grad=True)
    input_ids = captioner.tokenize(["a large red circle", "a blue square"])["input_ids"]
    soft_tokens = F.one_hot(input_ids, captioner.vocab_size).float().requires_grad_(True)
    image = spec.image_states(model, captioner.preprocess(pixels01))
    whole, _ = spec.text_logits(model, image, input_ids=input_ids)

    start = len(captioner.prefix_ids())
    with gradient_checkpointing_off(model):  # as models/caption_decoding.py makes cached calls
        logits, cache = spec.text_logits(model, image, input_ids=input_ids[:, :start], use_cache=True)
        stepwise = [logits]
        for position in range(start, input_ids.shape[1]):
            if feed == "input_ids":
                step = {"input_ids": input_ids[:, position, None]}
            else:
                step = {"inputs_embeds": soft_tokens[:, position, None] @ spec.word_embedding_matrix(model)}
            logits, cache = spec.text_logits(model, image, **step, cache=cache, use_cache=True)
            stepwise.append(logits)
    assert torch.allclose(torch.cat(stepwise, dim=1), whole, atol=1e-5)

    stepwise[-1].logsumexp(dim=-1).sum().backward()
    assert pixels01.grad is not None and pixels01.grad.abs().sum() > 0
    if feed == "inputs_embeds":
        assert soft_tokens.grad is not None and soft_tokens.grad[:, start:].abs().sum() > 0


def test_greedy_generate_and_the_wrappers_decoding_agree(opinionated_blip2: Captioner) -> None:
    """HF generate (placeholders filled by id, its own cache) and sample_captions on text_logits, argmax by a
    one-token nucleus, give the same captions, with and without a prompt; beams and sampling run."""
    captioner = opinionated_blip2
    torch.manual_seed(1)
    pixels01 = torch.rand(3, 3, 32, 32)
    uniforms = torch.rand(3, 1, 5)
    for prompt in (PROMPT, None):
        greedy = captioner.generate(pixels01, max_new_tokens=5, prompt=prompt)
        argmax = captioner.sample_captions(pixels01, uniforms=uniforms, top_p=1e-6, prompt=prompt)
        assert greedy == argmax.captions
        assert len({options[0] for options in greedy}) > 1, "different images should give different captions"
    prefix = captioner.prefix_ids().expand(3, -1)
    new_tokens = captioner.spec.generate(
        captioner.model, captioner.preprocess(pixels01), prefix, max_new_tokens=5
    )
    assert torch.equal(new_tokens, argmax.tokens["input_ids"][:, prefix.shape[1] :]), "only the new tokens"
    beams = captioner.generate(pixels01, num_beams=3, num_return_sequences=2, max_new_tokens=3)
    samples = captioner.generate(
        pixels01, do_sample=True, top_p=0.9, num_return_sequences=2, max_new_tokens=3
    )
    assert [len(options) for options in (*beams, *samples)] == [2] * 6


def test_lora_targets_only_the_opt_decoders_attention(blip2: Captioner) -> None:
    add_captioner_lora(blip2, rank=2, alpha=2)
    adapted = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in blip2.model.named_modules()
        if name.endswith(".lora_A")
    }
    expected = {
        f"language_model.model.decoder.layers.{layer}.self_attn.{projection}"
        for layer in range(blip2.model.config.text_config.num_hidden_layers)
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    assert adapted == expected


def test_an_encoder_decoder_language_model_is_refused_by_name_before_weights_load(tmp_path: Path) -> None:
    """The folder holds a config only: reaching the weights would fail with another error."""
    Blip2Config(
        text_config={"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2}
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'t5' language model"):
        Captioner.from_pretrained(str(tmp_path))


def test_a_checkpoint_without_image_placeholders_is_refused(blip2: Captioner) -> None:
    before_placeholders = blip2.model.config.to_dict() | {"image_token_index": None}
    with pytest.raises(ValueError, match="no image_token_index"):
        spec_for(Blip2Config(**before_placeholders))


def test_the_shipped_blip2_config_validates_with_the_familys_lora_targets(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "blip2_sd15_coco.yaml")
    assert config.captioner.lora.target_modules == Blip2Spec.lora_targets
    assert config.captioner.prompt is Blip2Spec.default_prompt is None
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
