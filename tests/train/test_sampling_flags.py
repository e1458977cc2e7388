"""--negative_prompt and --scheduler of `generate images` and `rerank images`: each family draws what its own
diffusers pipeline draws with the same negative prompt, scheduler and initial noise; a stochastic scheduler
draws each image alike in any batch; a scheduler name diffusers does not pair with the checkpoint's is refused
with the ones it does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, SchedulerMixin
from PIL import Image

from cycletune.evaluation.candidates import initial_noise
from cycletune.models.generator import Generator
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.models.tiny import TINY_GENERATORS
from cycletune.train.cli import generate, rerank
from cycletune.train.queries import prompt_records, text_queries

PROMPTS = ["a red circle at the top", "a small blue square", "a green triangle"]
NEGATIVE = "a big red square"
STEPS = 2
RESOLUTION = 16
# A scheduler to swap in per family: a DDPM family's differs from its built-in DDIM; a flow family has no
# scheduler diffusers pairs with its flow-matching Euler but that one.
SWAPPED = {
    "sd": "DPMSolverMultistepScheduler",
    "sdxl": "UniPCMultistepScheduler",
    "sd3": "FlowMatchEulerDiscreteScheduler",
    "flux": "FlowMatchEulerDiscreteScheduler",
}


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny generator folder per family (SD: the session's), and the session's pixel-space SD."""
    root = tmp_path_factory.mktemp("sampling_flags")
    others = {
        family: TINY_GENERATORS[family](root / family, seed=0, resolution=RESOLUTION)
        for family in ("sdxl", "sd3", "flux")
    }
    return {"sd": tiny_models.generator, "pixel": tiny_models.pixel_generator, **others}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _generate(folder: Path, prompts: Path, out: Path, *flags: str) -> np.ndarray:
    """`generate images` on base models; its PNGs as [prompt, image, H, W, 3] uint8."""
    argv = ["images", "--generator", str(folder), "--prompts", str(prompts), "--out", str(out)]
    argv += ["--num_inference_steps", str(STEPS), "--quiet", *flags]
    assert generate.main(argv) == 0
    return np.stack([_pngs(out, f"{position:05d}_*.png") for position in range(len(PROMPTS))])


def _pngs(folder: Path, pattern: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob(pattern))])


def _pipeline_pngs(
    folder: Path, prompts: Path, scheduler: type[SchedulerMixin], negative: str | None = NEGATIVE
) -> np.ndarray:
    """The family pipeline's own __call__ with that scheduler (built from the checkpoint's config, as
    diffusers users swap one), the negative prompt (None: the pipeline's default), the default CFG scale and
    the CLI's initial noise; as 8-bit pixels [prompt, 1, H, W, 3]."""
    generator = Generator.from_pretrained(str(folder))
    pipe = generator.pipeline(scheduler=scheduler.from_config(generator.sampling_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    ids = [query.id for query in text_queries(prompt_records(prompts))]
    latents = initial_noise(generator, ids, num_images=1, seed=SamplingSettings.seed)
    guidance = {"guidance_scale": SamplingSettings.guidance_scale}
    if generator.spec.name in ("sd3", "flux"):  # T5 at the generator's token budget, not the pipeline's
        guidance["max_sequence_length"] = generator.token_lengths()[-1]
    if generator.spec.name == "flux":  # CFG is true CFG; guidance_scale its distilled input (default 3.5)
        guidance["true_cfg_scale"] = guidance.pop("guidance_scale")
        latents = FluxPipeline._pack_latents(latents, *latents.shape)
    with torch.no_grad():
        images = pipe(
            PROMPTS,
            negative_prompt=None if negative is None else [negative] * len(PROMPTS),
            height=generator.resolution,
            width=generator.resolution,
            num_inference_steps=STEPS,
            latents=latents,
            output_type="pt",
            **guidance,
        ).images
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.numpy()[:, None]


def _assert_same_pixels(drawn: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to rounding to 8 bits (float differences of ~1e-6 can land either side of a level)."""
    assert drawn.shape == expected.shape
    assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1


def _differ(first: np.ndarray, second: np.ndarray) -> bool:
    return np.abs(first.astype(int) - second.astype(int)).max() > 3


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_negative_prompt_and_scheduler_draw_what_the_family_pipeline_draws(
    folders: dict[str, Path], prompts: Path, tmp_path: Path, family: str
) -> None:
    folder = folders[family]
    plain = _generate(folder, prompts, tmp_path / "plain")
    negative = _generate(folder, prompts, tmp_path / "negative", "--negative_prompt", NEGATIVE)
    assert _differ(plain, negative), "the negative prompt left the images as they were"
    built_in = DDIMScheduler if family in ("sd", "sdxl") else FlowMatchEulerDiscreteScheduler
    _assert_same_pixels(negative, _pipeline_pngs(folder, prompts, built_in))
    # With no negative prompt, what the pipeline draws by default (SDXL: zeroed embeddings); FluxPipeline
    # would not guide at all, so Flux guides away from the empty caption, as with the pipeline given "".
    _assert_same_pixels(plain, _pipeline_pngs(folder, prompts, built_in, "" if family == "flux" else None))
    by_name = _generate(folder, prompts, tmp_path / "by_name", "--scheduler", built_in.__name__)
    _assert_same_pixels(by_name, plain)

    flags = ("--negative_prompt", NEGATIVE, "--scheduler", SWAPPED[family])
    swapped = _generate(folder, prompts, tmp_path / "swapped", *flags)
    scheduler = getattr(diffusers, SWAPPED[family])
    _assert_same_pixels(swapped, _pipeline_pngs(folder, prompts, scheduler))
    if scheduler is not built_in:
        assert _differ(swapped, negative), f"{SWAPPED[family]} drew what the built-in sampler draws"


def test_sdxl_guides_from_zeros_only_where_its_checkpoint_says(
    folders: dict[str, Path], prompts: Path, tmp_path: Path
) -> None:
    """force_zeros_for_empty_prompt, read from model_index.json: set (as SDXL base saves it), no negative prompt
    is zero embeddings, not the empty caption; unset, it is the empty caption. An export keeps the setting."""
    folder = folders["sdxl"]
    plain = _generate(folder, prompts, tmp_path / "plain")
    empty = _generate(folder, prompts, tmp_path / "empty", "--negative_prompt", "")
    assert _differ(plain, empty), "no negative prompt drew what the empty caption draws"

    unset = tmp_path / "unset"
    shutil.copytree(folder, unset)
    index = json.loads((unset / "model_index.json").read_text())
    (unset / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    _assert_same_pixels(_generate(unset, prompts, tmp_path / "unset_plain"), empty)

    export = tmp_path / "export"
    Generator.from_pretrained(str(unset)).pipeline().save_pretrained(export)
    assert json.loads((export / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False


def test_a_stochastic_scheduler_draws_each_image_alike_in_any_batch(
    folders: dict[str, Path], prompts: Path, tmp_path: Path
) -> None:
    """EulerAncestral adds fresh noise at every step: drawn per image, so batches change nothing."""
    flags = ("--scheduler", "EulerAncestralDiscreteScheduler", "--num-images", "2")
    batched = _generate(folders["sd"], prompts, tmp_path / "batched", *flags, "--batch-size", "3")
    alone = _generate(folders["sd"], prompts, tmp_path / "alone", *flags, "--batch-size", "1")
    _assert_same_pixels(alone, batched)
    euler = _generate(folders["sd"], prompts, tmp_path / "euler", "--scheduler", "EulerDiscreteScheduler")
    assert _differ(batched[:, :1], euler), "the ancestral steps added no noise"


def test_rerank_images_draws_its_candidates_as_generate_does(
    tiny_models, prompts: Path, tmp_path: Path
) -> None:
    flags = ["--negative_prompt", NEGATIVE, "--scheduler", SWAPPED["sd"], "--num-images", "2"]
    drawn = _generate(tiny_models.generator, prompts, tmp_path / "generate", *flags)
    argv = ["images", "--generator", str(tiny_models.generator), "--captioner", str(tiny_models.captioner)]
    argv += ["--prompts", str(prompts), "--out", str(tmp_path / "rerank"), "--text-similarity", "token_f1"]
    assert rerank.main([*argv, "--num_inference_steps", str(STEPS), "--quiet", *flags]) == 0
    candidates = [_pngs(tmp_path / "rerank" / "images", f"q{q:05d}_c*.png") for q in range(len(PROMPTS))]
    _assert_same_pixels(np.stack(candidates), drawn)


@pytest.mark.parametrize(
    ("family", "flags", "message"),
    [
        ("sd", ["--scheduler", "NoSuchScheduler"], "'NoSuchScheduler' is not a diffusers scheduler"),
        ("sd", ["--scheduler", "AutoencoderKL"], "'AutoencoderKL' is not a diffusers scheduler"),
        ("sd", ["--scheduler", "FlowMatchEulerDiscreteScheduler"], "is not compatible with"),
        ("flux", ["--scheduler", "EulerDiscreteScheduler"], "compatible: FlowMatchEulerDiscreteScheduler"),
        ("sd", ["--negative_prompt", NEGATIVE, "--guidance_scale", "1"], "set guidance_scale > 1"),
        ("pixel", ["--scheduler", "EulerDiscreteScheduler"], "draws with its built-in sampler only"),
    ],
)
def test_a_flag_that_cannot_apply_exits_2_saying_why(
    folders: dict[str, Path],
    prompts: Path,
    tmp_path: Path,
    capsys,
    family: str,
    flags: list[str],
    message: str,
) -> None:
    argv = ["images", "--generator", str(folders[family]), "--prompts", str(prompts), "--out", str(tmp_path)]
    assert generate.main([*argv, "--quiet", *flags]) == 2
    error = capsys.readouterr().err
    assert message in error
    if family == "sd" and "--scheduler" in flags:  # the compatible ones are listed
        assert "compatible: DDIMScheduler, DDPMScheduler, DEISMultistepScheduler" in error
        assert "EulerAncestralDiscreteScheduler" in error and "UniPCMultistepScheduler" in error


@pytest.mark.parametrize("tool", [generate, rerank])
def test_help_shows_both_flags_with_their_defaults(tool, capsys) -> None:
    with pytest.raises(SystemExit):
        tool.parse_args(["images", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--negative_prompt NEGATIVE_PROMPT" in help_text
    assert "(default: the empty prompt; SDXL: zero embeddings" in help_text
    assert "--scheduler CLASS" in help_text
    assert "(default: the built-in sampler: DDIM, or flow-matching Euler)" in help_text
