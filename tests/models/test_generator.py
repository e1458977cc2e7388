"""Generator wrapper against hand-written diffusion formulas and diffusers' own StableDiffusionPipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, IPNDMScheduler, PNDMScheduler, StableDiffusionPipeline

from cycletune.models.generator import Generator

CAPTIONS = ["a red circle at the top", "a small blue square"]


@pytest.fixture(scope="module")
def pixel_generator(tiny_models) -> Generator:
    return Generator.from_pretrained(str(tiny_models.pixel_generator))


def _pixels(batch_size: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _noise(generator: Generator, batch_size: int, seed: int) -> torch.Tensor:
    return torch.randn(generator.latent_shape(batch_size), generator=torch.Generator().manual_seed(seed))


def _copy_model(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def _edit_json(path: Path, **updates: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}))


def _manual_loss(
    generator: Generator,
    latents: torch.Tensor,
    captions: list[str],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Per-sample MSE written out from the DDPM formulas rather than through scheduler helpers."""
    alpha_bar = generator.process.scheduler.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    context = generator.text_encoder(generator.tokenize(captions))[0]
    prediction = generator.unet(noisy, timesteps, encoder_hidden_states=context).sample
    if generator.prediction_type == "epsilon":
        target = noise
    else:
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    return ((prediction - target) ** 2).mean(dim=(1, 2, 3))


def test_loads_latent_and_pixel_space_folders(generator: Generator, pixel_generator: Generator) -> None:
    assert isinstance(generator.process.scheduler, DDPMScheduler)
    assert generator.prediction_type == "epsilon"
    assert generator.vae is not None and generator.vae_scale_factor == 2
    assert generator.resolution == 32 and generator.latent_shape(2) == (2, 4, 16, 16)
    assert pixel_generator.vae is None and pixel_generator.vae_scale_factor == 1
    assert pixel_generator.resolution == 32 and pixel_generator.latent_shape(2) == (2, 3, 32, 32)
    assert generator.device == torch.device("cpu") and generator.dtype == torch.float32


def test_load_overrides_and_bad_input(tiny_models, tmp_path: Path) -> None:
    v_model = Generator.from_pretrained(
        str(tiny_models.generator), resolution=64, prediction_type="v_prediction", torch_dtype=torch.bfloat16
    )
    assert v_model.prediction_type == "v_prediction" and v_model.resolution == 64
    assert v_model.latent_shape(1) == (1, 4, 32, 32)
    assert v_model.unet.dtype == v_model.vae.dtype == v_model.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        Generator.from_pretrained(str(tiny_models.generator), prediction_type="sample")
    with pytest.raises(ValueError, match="resolution 33"):
        Generator.from_pretrained(str(tiny_models.generator), resolution=33)
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionPipeline", "unet": [None, None], "tokenizer": [None, None]}
        )
    )
    with pytest.raises(ValueError, match="names no unet, text_encoder, tokenizer, scheduler"):
        Generator.from_pretrained(str(tmp_path))
    names_all = {name: ["diffusers", "X"] for name in ("unet", "text_encoder", "tokenizer", "scheduler")}
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionPipeline", **names_all, "vae": ["diffusers", "AutoencoderTiny"]}
        )
    )
    with pytest.raises(ValueError, match="vae class 'AutoencoderTiny'"):
        Generator.from_pretrained(str(tmp_path))


def test_sampling_scheduler_is_the_checkpoints_own_with_the_prediction_type_override(
    tiny_models, tmp_path: Path
) -> None:
    folder = _copy_model(tiny_models.generator, tmp_path)
    v_model = Generator.from_pretrained(str(folder), prediction_type="v_prediction")
    assert type(v_model.sampling_scheduler) is DDPMScheduler
    assert v_model.sampling_scheduler.config.prediction_type == "v_prediction"
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "IPNDMScheduler"])
    generator = Generator.from_pretrained(str(folder))
    assert isinstance(generator.sampling_scheduler, IPNDMScheduler)
    assert isinstance(generator.process.scheduler, DDPMScheduler)
    with pytest.raises(ValueError, match="IPNDMScheduler takes no prediction_type"):
        Generator.from_pretrained(str(folder), prediction_type="v_prediction")
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "AutoencoderKL"])
    with pytest.raises(ValueError, match="scheduler 'AutoencoderKL' is not a diffusers scheduler"):
        Generator.from_pretrained(str(folder))


def test_non_square_unet_needs_explicit_resolution(tiny_models, tmp_path: Path) -> None:
    folder = _copy_model(tiny_models.generator, tmp_path)
    _edit_json(folder / "unet" / "config.json", sample_size=[16, 16])
    with pytest.raises(ValueError, match="sample_size"):
        Generator.from_pretrained(str(folder))
    assert Generator.from_pretrained(str(folder), resolution=32).latent_shape(1) == (1, 4, 16, 16)


def test_tokenize_pads_truncates_and_accepts_empty(generator: Generator) -> None:
    input_ids = generator.tokenize(["", "red " * 200])
    assert input_ids.shape == (2, generator.tokenizer.model_max_length)
    assert input_ids[0, 0] == generator.tokenizer.bos_token_id
    assert (input_ids[0, 1:] == generator.tokenizer.pad_token_id).all()
    assert input_ids[1, -1] == generator.tokenizer.eos_token_id
    with pytest.raises(TypeError, match="single str"):
        generator.tokenize("a red circle")


def test_text_embeddings_match_stable_diffusion_pipeline(tiny_models, generator: Generator) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models.generator), safety_checker=None)
    prompt_embeds, negative_embeds = pipe.encode_prompt(CAPTIONS, "cpu", 1, True)
    with torch.no_grad():
        assert torch.equal(generator.encode_text(generator.tokenize(CAPTIONS)), prompt_embeds)
        assert torch.equal(generator.encode_text(generator.tokenize(["", ""])), negative_embeds)


def test_preprocess_resizes_differentiably(generator: Generator) -> None:
    same_size = _pixels(1)
    assert torch.equal(generator.preprocess(same_size), same_size * 2 - 1)
    pixels = _pixels(2, side=48).requires_grad_()
    processed = generator.preprocess(pixels)
    assert processed.shape == (2, 3, 32, 32)
    assert processed.min() >= -1 and processed.max() <= 1
    processed.sum().backward()
    assert pixels.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        generator.preprocess(torch.rand(3, 32, 32))


def test_encode_images_draws_from_vae_posterior(generator: Generator) -> None:
    pixels, vae_noise = _pixels(2), _noise(generator, 2, seed=1)
    scale = generator.vae.config.scaling_factor
    with torch.no_grad():
        posterior = generator.vae.encode(pixels * 2 - 1).latent_dist
        assert torch.allclose(generator.encode_images(pixels), posterior.mean * scale)
        drawn = generator.encode_images(pixels, vae_noise)
    assert drawn.shape == generator.latent_shape(2)
    assert torch.allclose(drawn, (posterior.mean + posterior.std * vae_noise) * scale)
    with pytest.raises(ValueError, match="vae_noise shape"):
        generator.encode_images(pixels, torch.zeros(2, 4, 8, 8))


def test_decode_is_differentiable_and_in_range(generator: Generator) -> None:
    latents = _noise(generator, 2, seed=2).requires_grad_()
    pixels = generator.decode_latents(latents)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= 0 and pixels.max() <= 1
    pixels.sum().backward()
    assert latents.grad.abs().sum() > 0


def test_pixel_space_round_trip(pixel_generator: Generator) -> None:
    pixels = _pixels(2)
    latents = pixel_generator.encode_images(pixels, noise=torch.randn(2, 3, 32, 32))
    assert torch.allclose(latents, pixels * 2 - 1)
    assert torch.allclose(pixel_generator.decode_latents(latents), pixels, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_matches_manual_denoise_loss(tiny_models, prediction_type: str) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator), prediction_type=prediction_type)
    pixels, noise, vae_noise = _pixels(2), _noise(generator, 2, seed=3), _noise(generator, 2, seed=4)
    timesteps = torch.tensor([17, 640])
    with torch.no_grad():
        loss = generator.denoise_loss(
            pixels, generator.tokenize(CAPTIONS), noise=noise, timesteps=timesteps, vae_noise=vae_noise
        )
        latents = generator.encode_images(pixels, vae_noise)
        expected = _manual_loss(generator, latents, CAPTIONS, noise, timesteps)
    assert loss.shape == (2,)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_pixel_space_forward_matches_manual_loss(pixel_generator: Generator) -> None:
    pixels, noise, timesteps = _pixels(2), _noise(pixel_generator, 2, seed=5), torch.tensor([3, 999])
    input_ids = pixel_generator.tokenize(CAPTIONS)
    with torch.no_grad():
        loss = pixel_generator.denoise_loss(pixels, input_ids, noise=noise, timesteps=timesteps)
        expected = _manual_loss(pixel_generator, pixels * 2 - 1, CAPTIONS, noise, timesteps)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_forward_is_per_sample_and_deterministic(generator: Generator) -> None:
    pixels, captions, timesteps = _pixels(3), [*CAPTIONS, ""], torch.tensor([5, 500, 950])
    noise = _noise(generator, 3, seed=6)

    def loss(rows: slice, noise: torch.Tensor) -> torch.Tensor:
        input_ids = generator.tokenize(captions[rows])
        return generator.denoise_loss(pixels[rows], input_ids, noise=noise[rows], timesteps=timesteps[rows])

    with torch.no_grad():
        batched = loss(slice(None), noise)
        assert torch.equal(batched, loss(slice(None), noise))
        alone = torch.cat([loss(slice(i, i + 1), noise) for i in range(3)])
        assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6)
        other_noise = loss(slice(None), _noise(generator, 3, seed=7))
    assert not torch.isclose(batched, other_noise).any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting(tiny_models, prediction_type: str) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator), prediction_type=prediction_type)
    pixels, noise, gamma = _pixels(3), _noise(generator, 3, seed=8), 5.0
    timesteps = torch.tensor([10, 150, 900])  # SNR far above, near, and far below gamma
    alpha_bar = generator.process.scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > gamma > snr[2]
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    input_ids = generator.tokenize([*CAPTIONS, ""])
    with torch.no_grad():
        plain = generator.denoise_loss(pixels, input_ids, noise=noise, timesteps=timesteps)
        weighted = generator.denoise_loss(
            pixels, input_ids, noise=noise, timesteps=timesteps, snr_gamma=gamma
        )
    assert torch.allclose(weighted, plain * weights, rtol=1e-5)


def test_gradients_reach_unet_and_pixels_through_frozen_vae(tiny_models) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator))
    generator.vae.requires_grad_(False)
    pixels = _pixels(1).requires_grad_()
    loss = generator.denoise_loss(
        pixels, generator.tokenize(CAPTIONS[:1]), noise=_noise(generator, 1, 9), timesteps=torch.tensor([300])
    )
    loss.sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert generator.unet.conv_in.weight.grad.abs().sum() > 0


def test_sample_shape_range_and_seeding(generator: Generator, pixel_generator: Generator) -> None:
    def draw(model: Generator, seed: int, guidance_scale: float) -> torch.Tensor:
        rng = torch.Generator().manual_seed(seed)
        return model.sample(CAPTIONS, num_inference_steps=3, guidance_scale=guidance_scale, generator=rng)

    for model in (generator, pixel_generator):
        first = draw(model, seed=0, guidance_scale=3.0)
        assert first.shape == (2, 3, 32, 32)
        assert first.min() >= 0 and first.max() <= 1
        assert torch.equal(first, draw(model, seed=0, guidance_scale=3.0))
        assert not torch.equal(first, draw(model, seed=1, guidance_scale=3.0))
        assert not torch.equal(first, draw(model, seed=0, guidance_scale=1.0))
    with pytest.raises(ValueError, match="latents shape"):
        generator.sample(CAPTIONS, latents=torch.zeros(1, 4, 16, 16))


def test_sample_matches_stable_diffusion_pipeline_with_ddim(tiny_models, tmp_path: Path) -> None:
    """With an SD 1.x style PNDM scheduler saved, DDIM must keep its set_alpha_to_one / steps_offset."""
    folder = _copy_model(tiny_models.generator, tmp_path)
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "PNDMScheduler"])
    generator = Generator.from_pretrained(str(folder))
    assert isinstance(generator.process.scheduler, DDPMScheduler)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = _noise(generator, 2, seed=10)
    for guidance_scale in (1.0, 4.0):
        theirs = pipe(
            CAPTIONS, num_inference_steps=4, guidance_scale=guidance_scale, latents=latents, output_type="pt"
        ).images
        ours = generator.sample(
            CAPTIONS, num_inference_steps=4, guidance_scale=guidance_scale, latents=latents
        )
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_short_overfit_lowers_loss(tiny_models) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator))
    generator.vae.requires_grad_(False)
    generator.text_encoder.requires_grad_(False)
    optimizer = torch.optim.Adam(generator.unet.parameters(), lr=1e-3)
    pixels, input_ids = _pixels(1), generator.tokenize(CAPTIONS[:1])
    noise, timesteps = _noise(generator, 1, seed=11), torch.tensor([400])
    losses = []
    for _ in range(50):
        loss = generator.denoise_loss(pixels, input_ids, noise=noise, timesteps=timesteps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_parts_load_only_from_diffusers_or_transformers(tiny_models, tmp_path: Path) -> None:
    """model_index.json names each part's class by library; no other library is imported by name."""
    folder = _copy_model(tiny_models.generator, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"text_encoder is os.system, not a class of diffusers or transformers"
    ):
        Generator.from_pretrained(str(folder))
