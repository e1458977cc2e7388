"""The SmolVLM family (models/captioners/smolvlm.py) on its tiny models, both architectures (SmolVLM and
Idefics3, the class of the SmolVLM v1 checkpoints): tokenizer, the processor's chat and image-token layout,
image states spliced into the Llama decoder on its KV cache, generation, LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cycletune.models.captioner import Captioner
from cycletune.models.captioners.smolvlm import SmolVLMSpec
from cycletune.models.lora import add_captioner_lora
from cycletune.models.modes import gradient_checkpointing_off

ARCHITECTURES = ["smolvlm", "idefics3"]
CAPTIONS = ["a red circle in the center", "the large blue square"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smolvlm")
    return {kind: SmolVLMSpec.save_tiny(root / kind, model_type=kind) for kind in ARCHITECTURES}


@pytest.fixture(scope="module")
def decisive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Captioner]:
    """Text weights at ten times the usual scale: greedy tokens then win by clear margins and differ between
    images, so a decoding that mixed images up (or dropped one) would show."""
    root = tmp_path_factory.mktemp("decisive")
    return {
        kind: Captioner.from_pretrained(
            str(SmolVLMSpec.save_tiny(root / kind, model_type=kind, text_options={"initializer_range": 0.2}))
        ).eval()
        for kind in ARCHITECTURES
    }


def _captioner(folder: Path, *, checkpointed: bool = False) -> Captioner:
    """Eval mode; or train mode with gradient checkpointing on, as the recipe trains it (no dropout here)."""
    captioner = Captioner.from_pretrained(str(folder), max_length=12)
    if not checkpointed:
        return captioner.eval()
    captioner.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return captioner.train()


def test_the_tiny_tokenizer_is_byte_level_bpe_with_smolvlms_special_tokens(tiny_folders) -> None:
    captioner = _captioner(tiny_folders["smolvlm"])
    tokenizer = captioner.tokenizer
    assert type(captioner.model).__name__ == "SmolVLMForConditionalGeneration"
    assert type(captioner.processor).__name__ == "SmolVLMProcessor"
    assert tokenizer.tokenize(" a red zebra") == ["Ġa", "Ġred", "Ġzebra"]
    assert tokenizer.tokenize("zebras")[0] == "zebra", "a word without a space before it has no Ġ"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<end_of_utterance>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    for special in ("<fake_token_around_image>", "<image>", "<global-img>", "<row_2_col_3>"):
        assert tokenizer.tokenize(special) == [special] and special in tokenizer.all_special_tokens
    assert "<|im_start|>" in captioner.processor.chat_template
    config = captioner.model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert captioner.model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert config.vision_config.initializer_range == 0.02


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_the_prefix_is_the_processors_chat_turn_for_one_unsplit_image(tiny_folders, kind: str) -> None:
    """The processor's own tokens for the chat template with an image and the prompt, even where its image
    processor splits images (as the real checkpoints' do): the spec always lays out one unsplit image."""
    captioner = _captioner(tiny_folders[kind])
    processor, prompt = captioner.processor, captioner.prompt
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert text == f"<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    inputs = processor(text=text, images=[image], return_tensors="pt")
    prefix = captioner.prefix_ids().tolist()
    assert inputs["input_ids"][0].tolist() == prefix
    assert prefix.count(captioner.model.config.image_token_id) == processor.image_seq_len == 4
    assert inputs["pixel_values"].shape[-2:] == (captioner.image_size,) * 2

    processor.image_processor.do_image_splitting = True
    assert captioner.prefix_ids().tolist() == prefix
    # Real checkpoints resize to a longest edge 4x their tile side before splitting.
    split = processor(text=text, images=[image], size={"longest_edge": 64}, return_tensors="pt")
    assert len(split["input_ids"][0]) > len(prefix), "splitting on, the processor adds the tiles' tokens"


def test_captions_follow_assistant_with_a_space_and_end_with_end_of_utterance(tiny_folders) -> None:
    captioner = _captioner(tiny_folders["smolvlm"])
    tokens = captioner.tokenize(CAPTIONS)
    start = captioner.caption_start + 1
    first = captioner.tokenizer.convert_ids_to_tokens(tokens["input_ids"][:, start].tolist())
    assert first == ["Ġa", "Ġthe"]
    ends = tokens["attention_mask"].sum(dim=1) - 1
    assert tokens["input_ids"][torch.arange(2), ends].tolist() == [captioner.tokenizer.eos_token_id] * 2
    assert captioner.tokenizer.convert_ids_to_tokens(captioner.prefix_ids()[-2:].tolist()) == [
        "Assistant",
        ":",
    ]


@pytest.mark.parametrize("feed", ["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_cached_decoding_equals_teacher_forcing_and_reaches_the_pixels(
    tiny_folders, kind: str, feed: str
) -> None:
    """The prefix once (image states spliced in at its placeholders), then one caption token a call on the KV
    cache, all as ids or all as one-hot @ embeddings, with checkpointing on in train mode: the teacher-forced logits, with gradients to
    the pixels (T2I2T) and the soft tokens (Gumbel decoding)."""
    captioner = _captioner(tiny_folders[kind], checkpointed=True)
    spec, model = captioner.spec, captioner.model
    torch.manual_seed(0)
    pixels01 = torch.rand(2, 3, 32, 32, requires_grad=True)
    tokens = captioner.tokenize(CAPTIONS)
    input_ids, mask = tokens["input_ids"], tokens["attention_mask"]
    image = spec.image_states(model, captioner.preprocess(pixels01))
    assert image.shape == (2, 4, model.config.text_config.hidden_size)
    teacher_forced = spec.logits(model, captioner.preprocess(pixels01), input_ids, mask)

    soft = F.one_hot(input_ids, captioner.vocab_size).float().requires_grad_(True)

    def fed(positions: slice) -> dict[str, torch.Tensor]:
        if feed == "input_ids":
            return {"input_ids": input_ids[:, positions]}
        return {"inputs_embeds": soft[:, positions] @ spec.word_embedding_matrix(model)}

    prefix = len(captioner.prefix_ids())
    with gradient_checkpointing_off(model):  # as models/caption_decoding.py makes cached calls
        logits, cache = spec.text_logits(model, image, **fed(slice(0, prefix)), use_cache=True)
        decoded = [logits]
        for position in range(prefix, input_ids.shape[1]):
            logits, cache = spec.text_logits(
                model, image, **fed(slice(position, position + 1)), cache=cache, use_cache=True
            )
            decoded.append(logits)
    cached = torch.cat(decoded, dim=1)
    in_caption = mask.bool()
    assert torch.allclose(cached[in_caption], teacher_forced[in_caption], atol=1e-5)

    cached[:, -1].logsumexp(dim=-1).sum().backward()
    assert pixels01.grad is not None and pixels01.grad.abs().sum() > 0
    if feed == "inputs_embeds":
        assert soft.grad is not None and soft.grad[:, prefix:].abs().sum() > 0


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_greedy_generate_and_sample_captions_decode_the_same_tokens(decisive, kind: str) -> None:
    """HF generate (pixel_values [B, 1, 3, H, W], its own cache) against the wrapper's decoding on text_logits
    with a nucleus of one token: the same captions, with the default prompt and with none."""
    captioner = decisive[kind]
    torch.manual_seed(1)
    pixels01 = torch.rand(3, 3, 32, 32)
    for prompt in (None, ""):
        greedy = captioner.generate(pixels01, max_new_tokens=6, prompt=prompt)
        argmax = captioner.sample_captions(pixels01, uniforms=torch.rand(3, 1, 6), top_p=1e-6, prompt=prompt)
        assert greedy == argmax.captions
        assert len({options[0] for options in greedy}) > 1, "the images should give different captions"
    beams = captioner.generate(pixels01, num_beams=3, num_return_sequences=2, max_new_tokens=4)
    samples = captioner.generate(
        pixels01, do_sample=True, top_p=0.9, num_return_sequences=2, max_new_tokens=4
    )
    assert [len(options) for options in (*beams, *samples)] == [2] * 6


def test_an_image_that_normalises_to_zeros_keeps_its_image_states(tiny_folders) -> None:
    """Mid-grey is all zeros after SmolVLM's 0.5/0.5 normalisation: the model's get_image_features takes such
    an image for batch padding and drops it; the spec's image states keep one entry per image."""
    captioner = _captioner(tiny_folders["smolvlm"])
    pixels01 = torch.stack([torch.full((3, 32, 32), 0.5), torch.rand(3, 32, 32)])
    pixel_values = captioner.preprocess(pixels01)
    assert not pixel_values[0].any()
    states = captioner.spec.image_states(captioner.model, pixel_values)
    assert states.shape[0] == 2 and not torch.equal(states[0], states[1])


def test_lora_targets_only_the_language_models_attention(tiny_folders) -> None:
    captioner = _captioner(tiny_folders["smolvlm"])
    add_captioner_lora(captioner, rank=2, alpha=2)
    adapted = sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in captioner.model.named_modules()
        if name.endswith(".lora_A")
    )
    layers = captioner.model.config.text_config.num_hidden_layers
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert adapted == sorted(
        f"model.text_model.layers.{layer}.self_attn.{projection}"
        for layer in range(layers)
        for projection in projections
    )


def test_save_tiny_refuses_an_image_size_the_connector_cannot_merge(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of patch_size 8 x scale_factor 2"):
        SmolVLMSpec.save_tiny(tmp_path, image_size=24)
