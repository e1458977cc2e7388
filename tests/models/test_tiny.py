"""The tiny models load through the same from_pretrained calls users run on hub ids, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cycletune.data import shapes
from cycletune.models.captioner import Captioner
from cycletune.models.captioners.blip import BlipSpec
from cycletune.models.generator import Generator
from cycletune.models.tiny import main, save_preset, save_tiny_generator
from cycletune.models.tiny_vocabulary import SHAPES_WORDS, default_vocabulary

SHAPES_CAPTIONS = [
    "a small red circle at the top left",
    "a picture of a large blue square in the center",
    "there is a big yellow triangle on the bottom right.",
    "an image of a green shape in the middle",
]
WEIGHT_FILES = (
    "captioner/model.safetensors",
    "generator/unet/diffusion_pytorch_model.safetensors",
    "generator/vae/diffusion_pytorch_model.safetensors",
    "generator/text_encoder/model.safetensors",
)


def _same_weights(first: Path, second: Path) -> bool:
    a, b = load_file(first), load_file(second)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_captioner_loads_offline_and_starts_decoding_from_dec(tiny_models) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_models.captioner)
    processor = BlipProcessor.from_pretrained(tiny_models.captioner)
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token == "[DEC]"
    assert model.config.text_config.bos_token_id == tokenizer.bos_token_id
    assert model.config.text_config.sep_token_id == tokenizer.sep_token_id
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.vision_config.initializer_range == 0.02
    # Random init must not collapse the vision features (BlipVisionConfig's default init range is 1e-10).
    assert model.vision_model.embeddings.patch_embedding.weight.std() > 1e-3

    inputs = processor(
        images=torch.zeros(3, 32, 32, dtype=torch.uint8), text=SHAPES_CAPTIONS[0], return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert inputs["input_ids"][0, 0] == tokenizer.cls_token_id  # like the real BLIP processor
    logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))
    generated = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=3)
    assert generated[0, 0] == tokenizer.bos_token_id


def test_generator_pipeline_loads_offline_and_samples(tiny_models) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_models.generator)
    assert isinstance(pipeline.scheduler, DDPMScheduler)
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    unet = UNet2DConditionModel.from_pretrained(tiny_models.generator, subfolder="unet")
    assert (unet.config.in_channels, unet.config.sample_size) == (4, 16)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.generator, subfolder="tokenizer")
    assert tokenizer.model_max_length == 77
    assert pipeline.text_encoder.config.eos_token_id == tokenizer.eos_token_id

    images = pipeline(
        SHAPES_CAPTIONS[0],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()


def test_pixel_generator_has_no_vae_and_denoises_pixels(tiny_models) -> None:
    from diffusers import StableDiffusionPipeline

    folder = tiny_models.pixel_generator
    assert not (folder / "vae").exists()
    assert json.loads((folder / "model_index.json").read_text())["vae"] == [None, None]
    # vae is a required pipeline component, so a folder without one loads only when told vae=None.
    pipeline = StableDiffusionPipeline.from_pretrained(folder, vae=None)
    assert pipeline.vae is None
    assert (pipeline.unet.config.in_channels, pipeline.unet.config.out_channels) == (3, 3)
    assert pipeline.unet.config.sample_size == 32
    ids = pipeline.tokenizer([SHAPES_CAPTIONS[0]], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        noise_prediction = pipeline.unet(torch.randn(1, 3, 32, 32), 10, pipeline.text_encoder(ids)[0]).sample
    assert noise_prediction.shape == (1, 3, 32, 32)


def test_tokenizers_round_trip_shapes_captions_without_unknowns(tiny_models, tmp_path) -> None:
    from transformers import BertTokenizer, CLIPTokenizer

    bert = BertTokenizer.from_pretrained(tiny_models.captioner)
    clip = CLIPTokenizer.from_pretrained(tiny_models.generator / "tokenizer")
    for caption in SHAPES_CAPTIONS:
        bert_ids = bert(caption).input_ids
        assert bert.unk_token_id not in bert_ids
        assert bert.decode(bert_ids, skip_special_tokens=True) == caption
        clip_ids = clip(caption).input_ids
        assert clip.unk_token_id not in clip_ids[1:-1]
        assert clip.decode(clip_ids, skip_special_tokens=True) == caption.replace(".", " .")
    for word in SHAPES_WORDS:  # every vocabulary word is a single token in both tokenizers
        assert bert.tokenize(word) == [word]
        assert clip.tokenize(word) == [word + "</w>"]
    # Unknown words still tokenize: WordPiece letter pieces, CLIP byte-level pieces.
    assert bert.unk_token_id not in bert("quokka").input_ids
    assert clip.unk_token_id not in clip("quokka").input_ids[1:-1]

    # The written vocab.json + merges.txt alone (the layout of real SD repos) give the same tokenizer.
    bpe_only = tmp_path / "bpe_only"
    bpe_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_models.generator / "tokenizer" / name, bpe_only / name)
    rebuilt = CLIPTokenizer.from_pretrained(bpe_only)
    assert [rebuilt(c).input_ids for c in SHAPES_CAPTIONS] == [clip(c).input_ids for c in SHAPES_CAPTIONS]


def test_cli_writes_both_folders_deterministically_per_seed(tiny_models, tmp_path, capsys) -> None:
    main(["--out", str(tmp_path / "seed0")])
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "seed0" / n) for n in ("captioner", "generator")
    ]
    main(["--out", str(tmp_path / "seed1"), "--seed", "1"])
    fixture_root = {"captioner": tiny_models.captioner, "generator": tiny_models.generator}
    for relative in WEIGHT_FILES:
        folder, _, rest = relative.partition("/")
        assert _same_weights(tmp_path / "seed0" / relative, fixture_root[folder] / rest), relative
        assert not _same_weights(tmp_path / "seed0" / relative, tmp_path / "seed1" / relative), relative


def test_saving_leaves_the_callers_random_state_alone(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    BlipSpec.save_tiny(tmp_path / "captioner", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_custom_vocabulary_and_bad_words(tmp_path) -> None:
    from transformers import BertTokenizer

    folder = BlipSpec.save_tiny(tmp_path / "custom", vocab_words=["Quokka", "wombat"])
    assert BertTokenizer.from_pretrained(folder).tokenize("quokka wombat") == ["quokka", "wombat"]
    with pytest.raises(ValueError, match=r"vocab_words\[1\] = 'two words'"):
        BlipSpec.save_tiny(tmp_path / "bad", vocab_words=["fine", "two words"])


def test_default_vocabulary_includes_the_shapes_grammar() -> None:
    words = default_vocabulary()
    assert set(SHAPES_WORDS) <= set(words)
    assert len(words) == len(set(words)) > 200
    assert set(shapes.WORDS) <= set(SHAPES_WORDS)  # models/tiny.py keeps its own copy of the grammar's words


def test_shapes_base_preset_is_a_pixel_space_v_prediction_model(tmp_path) -> None:
    main(["--out", str(tmp_path), "--preset", "shapes-base"])
    generator = Generator.from_pretrained(str(tmp_path / "generator"))
    assert generator.vae is None and generator.prediction_type == "v_prediction"
    scheduler = generator.process.scheduler.config
    assert (scheduler.beta_schedule, scheduler.timestep_spacing) == ("squaredcos_cap_v2", "trailing")
    assert {type(block).__name__ for block in generator.unet.down_blocks[:2]} == {"DownBlock2D"}
    images = generator.sample(["a small red circle in the center"], num_inference_steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    captioner = Captioner.from_pretrained(str(tmp_path / "captioner"))
    assert captioner.model.config.text_config.hidden_size == 64


@pytest.mark.parametrize(
    ("preset", "unet_parameters"), [("bench-tiny", 985_444), ("bench-small", 17_839_556)]
)
def test_bench_presets_have_the_sizes_the_readme_quotes(tmp_path, preset: str, unet_parameters: int) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    captioner, generator = save_preset(tmp_path, preset)
    unet = UNet2DConditionModel.from_pretrained(generator, subfolder="unet")
    assert unet.num_parameters() == unet_parameters  # README: 0.99M and 17.8M
    text = CLIPTextModel.from_pretrained(generator, subfolder="text_encoder")
    assert text.config.vocab_size == 49408 and unet.config.cross_attention_dim == text.config.hidden_size
    assert Generator.from_pretrained(str(generator)).latent_shape(1)[-1] == unet.config.sample_size
    assert Captioner.from_pretrained(str(captioner)).model.config.vision_config.initializer_range == 0.02


def test_size_options_that_cannot_work_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="generator text_options vocab_size=10 is below the tokenizer's"):
        save_tiny_generator(tmp_path / "generator", text_options={"vocab_size": 10})
    with pytest.raises(ValueError, match="captioner text_options vocab_size=10 is below the tokenizer's"):
        BlipSpec.save_tiny(tmp_path / "captioner", text_options={"vocab_size": 10})
    with pytest.raises(ValueError, match="vae_options given with with_vae=False"):
        save_tiny_generator(tmp_path / "pixels", with_vae=False, vae_options={"layers_per_block": 2})
    with pytest.raises(ValueError, match="unknown tiny-model preset 'huge'"):
        save_preset(tmp_path, "huge")
