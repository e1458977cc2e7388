"""The GIT family (models/captioners/git.py) on its tiny model: tokenizer, the processor's layout, the decoder
run from precomputed patch tokens (text positions only, KV cache, gradients), generation, LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BertTokenizer, CLIPImageProcessor, GitForCausalLM

from cycletune.models.captioner import Captioner
from cycletune.models.captioners.git import GitSpec
from cycletune.models.lora import add_captioner_lora
from cycletune.models.modes import gradient_checkpointing_off

PROMPT = "a picture of"


@pytest.fixture(scope="module")
def tiny_git(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return GitSpec.save_tiny(tmp_path_factory.mktemp("git"), seed=0)


@pytest.fixture
def git_captioner(tiny_git: Path) -> Captioner:
    return Captioner.from_pretrained(str(tiny_git), max_length=8).eval()


@pytest.fixture(scope="module")
def decisive_git(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    """Decoder weights ten times the usual scale: greedy captions then differ between random images (at the
    usual scale the text dominates), so a decoding that mixed up images or dropped them would show."""
    folder = GitSpec.save_tiny(tmp_path_factory.mktemp("git"), text_options={"initializer_range": 0.2})
    return Captioner.from_pretrained(str(folder)).eval()


def _training_git(tiny_git: Path) -> Captioner:
    """LoRA and gradient checkpointing in train mode, as train/builders.py sets the captioner up, but without
    dropout, so that its outputs are comparable with each other."""
    processor = AutoProcessor.from_pretrained(tiny_git)
    model = GitForCausalLM.from_pretrained(
        tiny_git, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    captioner = Captioner(model, processor)
    add_captioner_lora(captioner, rank=2, alpha=2)
    captioner.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return captioner.train()


def test_the_tiny_tokenizer_is_bert_wordpiece_with_gits_special_tokens(git_captioner: Captioner) -> None:
    tokenizer, config = git_captioner.tokenizer, git_captioner.model.config
    assert isinstance(tokenizer, BertTokenizer)
    assert isinstance(git_captioner.processor.image_processor, CLIPImageProcessor)
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.pad_token_id,
    )
    pieces = tokenizer.tokenize("Zebras")
    assert pieces[0] == "zebra" and all(piece.startswith("##") for piece in pieces[1:])
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("source_size", [32, 48])
def test_the_prefix_and_pixels_match_gits_own_processor(git_captioner: Captioner, source_size: int) -> None:
    """GitProcessor gives [CLS] prompt [SEP]; captions continue [CLS] prompt. Its image processor resizes
    the shortest edge and center-crops: for a square image, the resize preprocess() does."""
    row, column = torch.meshgrid(
        torch.linspace(0, 1, source_size), torch.linspace(0, 1, source_size), indexing="ij"
    )
    # Smooth, so that 8-bit and float resizing agree closely.
    image = torch.stack([row, column, (1 - row) * column])
    image8 = (image * 255).round().to(torch.uint8)
    inputs = git_captioner.processor(
        images=Image.fromarray(image8.permute(1, 2, 0).numpy()), text=PROMPT, return_tensors="pt"
    )
    sep = git_captioner.tokenizer.sep_token_id
    assert inputs["input_ids"][0].tolist() == [*git_captioner.prefix_ids(PROMPT).tolist(), sep]
    assert git_captioner.prefix_ids().tolist() == [git_captioner.tokenizer.cls_token_id]
    assert git_captioner.caption_start == 0
    pixel_values = git_captioner.preprocess(image8[None].float() / 255)
    assert pixel_values.shape == inputs["pixel_values"].shape == (1, 3, 32, 32)
    # The processor resizes 8-bit pixels (rounding between its two separable passes); we resize floats.
    assert (pixel_values - inputs["pixel_values"]).abs().max() < (1e-5 if source_size == 32 else 0.03)


def test_text_logits_are_the_models_logits_of_the_text_positions(git_captioner: Captioner) -> None:
    torch.manual_seed(0)
    pixels01 = torch.rand(2, 3, 32, 32)
    tokens = git_captioner.tokenize(["a red circle", "the small blue square"])
    pixel_values = git_captioner.preprocess(pixels01)
    full = git_captioner.model(
        pixel_values=pixel_values, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
    ).logits
    text = git_captioner.logits(pixels01, tokens["input_ids"], tokens["attention_mask"])
    image_tokens = git_captioner.spec.image_states(git_captioner.model, pixel_values).shape[1]
    assert full.shape[1] == image_tokens + text.shape[1]
    assert torch.allclose(full[:, image_tokens:], text, atol=1e-5)


@pytest.mark.parametrize("feed", ["input_ids", "inputs_embeds"])
def test_cached_decoding_equals_teacher_forcing_and_passes_gradients(tiny_git: Path, feed: str) -> None:
    """Step by step on the KV cache (patch tokens cached once, text positions counted from the first text
    token), with checkpointing on in train mode as in the sampled cycle modes: the teacher-forced logits."""
    captioner = _training_git(tiny_git)
    spec, model = captioner.spec, captioner.model
    torch.manual_seed(0)
    pixels01 = torch.rand(2, 3, 32, 32, requires_grad=True)
    input_ids = captioner.tokenize(["a red circle in the center", "a large blue square"])["input_ids"]
    one_hot = torch.nn.functional.one_hot(input_ids, captioner.vocab_size).float().requires_grad_(True)
    image = spec.image_states(model, captioner.preprocess(pixels01))
    teacher_forced, _ = spec.text_logits(model, image, input_ids=input_ids)

    prefix = len(captioner.prefix_ids())
    with gradient_checkpointing_off(model):  # as models/caption_decoding.py makes cached calls
        logits, cache = spec.text_logits(model, image, input_ids=input_ids[:, :prefix], use_cache=True)
        steps = [logits]
        for position in range(prefix, input_ids.shape[1]):
            token = (
                {"input_ids": input_ids[:, position : position + 1]}
                if feed == "input_ids"
                else {
                    "inputs_embeds": one_hot[:, position : position + 1] @ spec.word_embedding_matrix(model)
                }
            )
            logits, cache = spec.text_logits(model, image, **token, cache=cache, use_cache=True)
            steps.append(logits)
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, teacher_forced, atol=1e-5)

    cached[:, -1].logsumexp(dim=-1).sum().backward()
    assert pixels01.grad is not None and pixels01.grad.abs().sum() > 0
    if feed == "inputs_embeds":
        assert one_hot.grad is not None and one_hot.grad[:, prefix:].abs().sum() > 0


def test_greedy_generate_and_sample_captions_decode_the_same_layout(decisive_git: Captioner) -> None:
    """HF generate (pixel_values, cache of its own) and the wrapper's decoding on text_logits agree token for
    token: greedy against a nucleus of one token, with and without a prompt."""
    torch.manual_seed(1)
    pixels01 = torch.rand(3, 3, 32, 32)
    uniforms = torch.rand(3, 1, 6)
    for prompt in (None, PROMPT):
        greedy = decisive_git.generate(pixels01, max_new_tokens=6, prompt=prompt)
        argmax = decisive_git.sample_captions(pixels01, uniforms=uniforms, top_p=1e-6, prompt=prompt)
        assert greedy == argmax.captions
        assert len({options[0] for options in greedy}) > 1, "the images should give different captions"
    beams = decisive_git.generate(pixels01, num_beams=3, num_return_sequences=2, max_new_tokens=4)
    samples = decisive_git.generate(
        pixels01, do_sample=True, top_p=0.9, num_return_sequences=2, max_new_tokens=4
    )
    assert [len(options) for options in (*beams, *samples)] == [2] * 6


def test_lora_targets_only_the_decoders_attention(git_captioner: Captioner) -> None:
    add_captioner_lora(git_captioner, rank=2, alpha=2)
    adapted = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in git_captioner.model.named_modules()
        if name.endswith(".lora_A")
    }
    layers = git_captioner.model.config.num_hidden_layers
    expected = {
        f"git.encoder.layer.{layer}.attention.{projection}"
        for layer in range(layers)
        for projection in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert adapted == expected
