"""Every generator family (models/generators/) through the same checks: the recipe trains it in each T2I2T
mode and with full fine-tuning, and keeps it frozen under each I2T2I mode; each cycle term's gradient lands on
the model it trains and nowhere else; the exported LoRA, kohya and merged files load in the family's own
diffusers pipeline and draw what the trained model draws; and every CLI runs on a run's export.

A family is covered here as soon as it is listed in models/generators/SPECS.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cycle_runs import run_recipe_in_process, tiny_overrides
from diffusers import DiffusionPipeline
from lora_weights import perturb_lora
from phase_runs import build_models, phase_batch, phase_config, run_phase
from PIL import Image
from safetensors.torch import load_file

from cycletune.models.cache import FrozenEncoderCache
from cycletune.models.generator import Generator
from cycletune.models.generators import SPECS
from cycletune.models.lora import (
    DIFFUSERS_LORA_FILE,
    KOHYA_LORA_FILE,
    add_generator_lora,
    prepare_trainable,
    save_generator_lora,
    save_merged_generator,
)
from cycletune.models.tiny import TINY_GENERATORS
from cycletune.train.cli import evaluate, generate, rerank
from cycletune.train.run_dir import RunDir

FAMILIES = [spec.name for spec in SPECS]
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
PROMPTS = ["a red circle", "a blue square"]
# 16 px images, 8x8 latents: still enough for SDXL's UNet to downsample and for SD3's and Flux's 2x2 patches.
RESOLUTION = 16

# Recipe runs, each training several modes at once: the family is trained by a T2I2T mode (or fully, on the
# denoising loss alone) while it is the frozen partner of an I2T2I mode.
RUNS = {
    "sample+soft": [
        "cycle.t2i2t.mode=sample",
        "cycle.t2i2t.num_inference_steps=2",
        "cycle.i2t2i.mode=soft",
    ],
    "one_step+reward": [
        "cycle.t2i2t.mode=one_step",
        "cycle.i2t2i.mode=reward",
        "cycle.i2t2i.num_candidates=2",
    ],
    "full+gumbel": ["generator.train_mode=full", "cycle.i2t2i.mode=gumbel"],
}


@pytest.fixture(scope="module")
def family_models(tiny_models, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Per family: a tiny generator of that family beside the session's tiny BLIP captioner."""
    root = tmp_path_factory.mktemp("generator_families")
    return {
        name: SimpleNamespace(
            captioner=tiny_models.captioner,
            generator=TINY_GENERATORS[name](root / name, seed=0, resolution=RESOLUTION),
        )
        for name in FAMILIES
    }


@pytest.fixture(scope="module")
def recipe_run(family_models, tmp_path_factory) -> Callable[[str, str], tuple[int, Path]]:
    """(family, RUNS key) -> the recipe's exit code and output folder; each run happens once per module, so
    the CLI test reuses a training test's export."""
    done: dict[tuple[str, str], tuple[int, Path]] = {}

    def run(family: str, name: str) -> tuple[int, Path]:
        if (family, name) not in done:
            output_dir = tmp_path_factory.mktemp(f"{family}-{name}") / "run"
            overrides = [
                *tiny_overrides(family_models[family], output_dir),
                *RUNS[name],
                "train.max_train_steps=2",
                "train.checkpointing_steps=2",
            ]
            done[family, name] = (
                run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides]),
                output_dir,
            )
        return done[family, name]

    return run


def _moved_lora_up_weights(file: Path) -> bool:
    """LoRA up (B) weights start at zero: a file whose up weights are all zero never trained. peft names them
    lora_B, diffusers' legacy layout lora.up."""
    weights = load_file(str(file))
    up = [tensor for key, tensor in weights.items() if "lora_B" in key or "lora.up" in key]
    assert up, f"{file.name} holds no LoRA up weights"
    return any(tensor.abs().sum() > 0 for tensor in up)


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_recipe_trains_the_family_and_keeps_it_as_a_frozen_partner(
    family_models, recipe_run, family: str, run: str
) -> None:
    code, output_dir = recipe_run(family, run)
    assert code == 0
    export = RunDir(output_dir).export_dir
    if run.startswith("full"):
        spec = SPEC_BY_NAME[family]
        base = getattr(spec.pipeline_class.from_pretrained(family_models[family].generator), spec.denoiser)
        trained = getattr(spec.pipeline_class.from_pretrained(export / "generator"), spec.denoiser)
        before = base.state_dict()
        changed = [
            name for name, after in trained.state_dict().items() if not torch.equal(before[name], after)
        ]
        assert changed, "full fine-tuning changed no denoiser weight"
    else:
        assert _moved_lora_up_weights(export / "generator" / DIFFUSERS_LORA_FILE), (
            "generator LoRA never moved"
        )
    assert _moved_lora_up_weights(export / "captioner" / "adapter_model.safetensors"), "captioner never moved"


# (phase, cycle mode): every cycle term that runs through the family, trained (T2I2T) or frozen (I2T2I
# modes that carry soft captions into its text encoders).
CYCLE_ROUTES = [
    ("generator", "cycle.t2i2t.mode=one_step"),
    ("generator", "cycle.t2i2t.mode=sample"),
    ("captioner", "cycle.i2t2i.mode=soft"),
    ("captioner", "cycle.i2t2i.mode=gumbel"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_cycle_term_gives_gradient_to_the_trained_model_alone(family_models, family: str) -> None:
    """The supervised weights are 0, so whatever gradient arrives came through the cycle term; every partner
    weight may take a gradient (requires_grad on), so only the phase's freezing keeps it out."""
    supervised_off = ("captioner.caption_loss_weight=0", "generator.denoise_loss_weight=0")
    models = build_models(phase_config(family_models[family], "cycle.i2t2i.mode=soft", *supervised_off))
    captioner, captioner_names, generator, generator_names, _ = models
    trained_names = {"captioner": captioner_names, "generator": generator_names}
    for model, names in ((captioner, captioner_names), (generator, generator_names)):
        perturb_lora(model, names, seed=5, scale=0.05, replace=False)
    for phase, mode in CYCLE_ROUTES:
        trained, partner = (captioner, generator) if phase == "captioner" else (generator, captioner)
        partner.requires_grad_(True)
        output = run_phase(
            phase, models, phase_config(family_models[family], mode, *supervised_off), phase_batch()
        )
        sum(output.terms.values()).backward()
        landed = {
            name: param.grad for name, param in trained.named_parameters() if name in trained_names[phase]
        }
        assert all(grad is not None and grad.isfinite().all() for grad in landed.values()), mode
        assert any(grad.abs().sum() > 0 for grad in landed.values()), f"{mode}: the {phase} got no gradient"
        leaked = [name for name, param in partner.named_parameters() if param.grad is not None]
        assert not leaked, f"{mode}: the frozen partner got gradients: {leaked[:3]}"
        trained.zero_grad(set_to_none=True)


@torch.no_grad()
def _draw(pipeline: DiffusionPipeline) -> torch.Tensor:
    """Two seeded 2-step images from the pipeline's own __call__ (its sampler, its guidance)."""
    draws = torch.Generator().manual_seed(0)
    return pipeline(
        PROMPTS, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, generator=draws, output_type="pt"
    ).images


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lora_kohya_and_merged_files_load_in_the_family_pipeline(
    family_models, tmp_path: Path, family: str
) -> None:
    folder = family_models[family].generator
    generator = Generator.from_pretrained(str(folder))
    add_generator_lora(generator, rank=4, alpha=8.0)
    perturb_lora(generator, prepare_trainable(generator, train_mode="lora"), seed=0, scale=0.1, replace=False)
    trained = _draw(generator.eval().pipeline())
    spec = generator.spec
    lora_dir = save_generator_lora(generator, tmp_path / "lora", kohya=spec.kohya_export)
    if not spec.kohya_export:
        with pytest.raises(ValueError, match="kohya"):
            save_generator_lora(generator, tmp_path / "kohya", kohya=True)

    pipeline = spec.pipeline_class.from_pretrained(folder)
    base = _draw(pipeline)
    pipeline.load_lora_weights(lora_dir, weight_name=DIFFUSERS_LORA_FILE)
    loaded = _draw(pipeline)
    assert (loaded - base).abs().max() > 1e-2, "the exported LoRA left the pipeline's images as they were"
    torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=0, msg=lambda m: f"{family} LoRA file: {m}")
    if spec.kohya_export:
        kohya = spec.pipeline_class.from_pretrained(folder)
        kohya.load_lora_weights(lora_dir, weight_name=KOHYA_LORA_FILE)
        torch.testing.assert_close(_draw(kohya), loaded, atol=1e-4, rtol=0)
    merged = spec.pipeline_class.from_pretrained(save_merged_generator(generator, tmp_path / "merged"))
    assert not getattr(getattr(merged, spec.denoiser), "peft_config", None)
    torch.testing.assert_close(_draw(merged), trained, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random images captioned with PROMPTS (metadata.jsonl), and a prompts file of PROMPTS."""
    root = tmp_path_factory.mktemp("cli_inputs")
    images = root / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 32, 32, 3), dtype=np.uint8)
    for index, array in enumerate(pixels):
        Image.fromarray(array).save(images / f"{index}.png")
    rows = [{"file_name": f"{index}.png", "text": prompt} for index, prompt in enumerate(PROMPTS)]
    (images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return images, root / "prompts.txt"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cli_runs_on_the_familys_export(
    recipe_run, inputs: tuple[Path, Path], tmp_path: Path, family: str
) -> None:
    code, output_dir = recipe_run(family, "sample+soft")
    assert code == 0
    run_dir = RunDir(output_dir)
    images, prompts = inputs
    model = ["--checkpoint", str(run_dir.export_dir), "--batch-size", "2", "--inference-steps", "2"]
    images, prompts, out = str(images), str(prompts), str(tmp_path)
    commands = {
        "generate images": (
            generate,
            ["images", "--prompts", prompts, "--num-images", "2", "--out", f"{out}/drawn"],
        ),
        "rerank captions": (
            rerank,
            ["captions", "--images", images, "--num-samples", "2", "--out", f"{out}/rc"],
        ),
        "rerank images": (
            rerank,
            ["images", "--prompts", prompts, "--num-images", "2", "--out", f"{out}/ri"],
        ),
        "evaluate": (
            evaluate,
            [
                "--config",
                str(run_dir.config_file),
                "--limit",
                "2",
                "--metrics",
                "bleu_4,psnr",
                "--out",
                f"{out}/m.json",
            ],
        ),
    }
    for name, (cli, argv) in commands.items():
        assert cli.main([*argv, *model]) == 0, name
    drawn = [json.loads(line) for line in (tmp_path / "drawn" / "images.jsonl").read_text().splitlines()]
    assert len(drawn) == 2 and all(len(row["files"]) == 2 for row in drawn)
    assert all((tmp_path / folder / "rankings.jsonl").read_text().strip() for folder in ("rc", "ri"))
    assert set(json.loads((tmp_path / "m.json").read_text())["metrics"]) >= {"bleu_4", "psnr"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_encoder_cache_serves_what_the_frozen_encoders_compute(family_models, family: str) -> None:
    """Every text encoder's states and pooled vector (one conditioning row per caption) and the VAE posterior
    with the family's shift and scale come back from the cache as computed afresh."""
    generator = Generator.from_pretrained(str(family_models[family].generator)).requires_grad_(False)
    generator.encoder_cache = FrozenEncoderCache(text=True, images=True)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    vae_noise = torch.randn(generator.latent_shape(2), generator=torch.Generator().manual_seed(1))
    fresh_text = generator.encode_text(generator.tokenize(PROMPTS))
    fresh_latents = generator.encode_images(pixels, vae_noise)
    for _ in range(2):  # a miss, then a hit
        torch.testing.assert_close(generator.encode_captions(PROMPTS), fresh_text, rtol=0, atol=1e-6)
        cached = generator.data_latents(pixels, vae_noise, ["a", "b"])
        torch.testing.assert_close(cached, fresh_latents, rtol=0, atol=1e-5)
    stats = generator.encoder_cache.stats()
    assert stats["text_hits"] == 2 and stats["image_hits"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_t2i2t_reward_trains_every_family(family_models, tmp_path: Path, family: str) -> None:
    """Each family's own sampler made stochastic (DDIM for SD and SDXL, the Euler sampler's SDE for SD3 and
    Flux) gives the chains the reward mode trains the generator's LoRA on."""
    output_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(family_models[family], output_dir),
        "cycle.t2i2t.mode=reward",
        "cycle.t2i2t.num_images=2",
        "cycle.t2i2t.num_inference_steps=2",
        "generator.denoise_loss_weight=0",
        "train.schedule=[generator]",
        "train.max_train_steps=2",
    ]
    assert run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides]) == 0
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [entry["generator/t2i2t_reward/reward_mean"] for entry in metrics if "generator/lr" in entry]
    assert len(rewards) == 2 and all(np.isfinite(rewards))
    export = RunDir(output_dir).export_dir
    assert _moved_lora_up_weights(export / "generator" / DIFFUSERS_LORA_FILE), "generator LoRA never moved"
