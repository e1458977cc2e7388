"""Every captioner family (models/captioners/) through the same checks: the recipe trains each I2T2I mode with
the family and T2I2T one_step with it as the frozen partner, gradients reach only the trained model, the
exported adapter loads in PEFT and changes the captions, and the captioner memorizes six captions word for
word (which catches prompt, start-token and special-token mistakes that no loss value shows).

A family is covered here as soon as it is listed in models/captioners/SPECS.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cycle_runs import run_recipe_in_process, tiny_overrides
from lora_weights import perturb_lora
from peft import PeftModel
from phase_runs import build_models, phase_batch, phase_config, run_phase
from PIL import Image
from safetensors.torch import load_file

from cycletune.losses.i2t2i import I2T2I_MODES
from cycletune.models.captioner import Captioner
from cycletune.models.captioners import SPECS
from cycletune.train.cli import evaluate, export, generate, rerank
from cycletune.train.run_dir import RunDir

FAMILIES = [spec.name for spec in SPECS]
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}

# Six captions, one solid colour each: a captioner that cannot learn these has a layout bug, not a capacity one.
MEMORY = {
    "a red circle": (0.9, 0.1, 0.1),
    "a green square": (0.1, 0.8, 0.2),
    "a blue triangle": (0.1, 0.2, 0.9),
    "a large yellow shape": (0.9, 0.9, 0.1),
    "a small purple circle in the center": (0.6, 0.1, 0.7),
    "the orange square": (1.0, 0.5, 0.0),
}


@pytest.fixture(scope="module")
def family_models(tiny_models, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Per family: a tiny captioner of that family beside the session's tiny generator."""
    root = tmp_path_factory.mktemp("families")
    return {
        name: SimpleNamespace(
            captioner=SPEC_BY_NAME[name].save_tiny(root / name, seed=0), generator=tiny_models.generator
        )
        for name in FAMILIES
    }


def _inputs(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _solid_images(colours: list[tuple[float, float, float]], size: int = 32) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size).clone()


@pytest.mark.parametrize("mode", list(I2T2I_MODES.modes))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_recipe_trains_each_i2t2i_mode_and_one_step_with_the_family(
    family_models, tmp_path: Path, family: str, mode: str
) -> None:
    output_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(family_models[family], output_dir),
        f"cycle.i2t2i.mode={mode}",
        "cycle.t2i2t.mode=one_step",
        "cycle.i2t2i.num_candidates=2",
        "train.max_train_steps=2",
        "train.checkpointing_steps=2",
    ]
    code = run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides])
    assert code == 0
    adapter = load_file(str(RunDir(output_dir).export_dir / "captioner" / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().sum() > 0 for tensor in lora_b), "the captioner's LoRA never moved"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_exports_a_model_that_loads_on_its_own(
    family_models, tmp_path: Path, family: str
) -> None:
    output_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(family_models[family], output_dir),
        "captioner.train_mode=full",
        "cycle.i2t2i.mode=soft",
        "train.max_train_steps=2",
        "train.checkpointing_steps=2",
    ]
    assert run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides]) == 0
    base = Captioner.from_pretrained(str(family_models[family].captioner))
    trained = Captioner.from_pretrained(str(RunDir(output_dir).export_dir / "captioner"))
    assert type(trained.model) is type(base.model)
    changed = [
        name
        for (name, before), after in zip(
            base.model.state_dict().items(), trained.model.state_dict().values(), strict=True
        )
        if not torch.equal(before, after)
    ]
    assert changed, "full fine-tuning changed no captioner weight"


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_only_the_trained_model_with_supervised_weights_at_zero(
    family_models, family: str
) -> None:
    weights_off = ("captioner.caption_loss_weight=0", "generator.denoise_loss_weight=0")
    models = build_models(phase_config(family_models[family], "cycle.i2t2i.mode=soft", *weights_off))
    captioner, captioner_names, generator, generator_names, _ = models
    perturb_lora(captioner, captioner_names, seed=5, scale=0.05, replace=False)
    perturb_lora(generator, generator_names, seed=5, scale=0.05, replace=False)
    routes = [("captioner", f"cycle.i2t2i.mode={mode}") for mode in I2T2I_MODES.modes]
    for phase, mode in [*routes, ("generator", "cycle.t2i2t.mode=one_step")]:
        trained, names, partner = (
            (captioner, captioner_names, generator)
            if phase == "captioner"
            else (generator, generator_names, captioner)
        )
        partner.requires_grad_(True)
        before = {name: param.detach().clone() for name, param in partner.named_parameters()}
        config = phase_config(family_models[family], mode, *weights_off)
        output = run_phase(phase, models, config, phase_batch())
        sum(output.terms.values()).backward()
        grads = [param.grad for name, param in trained.named_parameters() if name in names]
        assert all(grad is not None and torch.isfinite(grad).all() for grad in grads), mode
        assert sum(grad.abs().sum() for grad in grads) > 0, f"{mode}: no gradient reached the {phase}"
        leaked = [name for name, param in partner.named_parameters() if param.grad is not None]
        assert not leaked, f"{mode}: partner parameters got a gradient: {leaked[:3]}"
        assert all(torch.equal(param, before[name]) for name, param in partner.named_parameters())
        trained.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_gumbel_decoding_keeps_its_cache_under_gradient_checkpointing(family_models, family: str) -> None:
    """The gumbel mode decodes the trained captioner in train mode. With gradient checkpointing on, transformers
    drops the KV cache of a checkpointed layer (or a recompute would write it twice), and each step would see
    only its own token, unless decoding switches checkpointing off: it must decode, and pass gradients, exactly
    as without checkpointing."""
    captioner = Captioner.from_pretrained(str(family_models[family].captioner), max_length=8).train()
    pixels = _solid_images(list(MEMORY.values())[:2], captioner.image_size)
    draws = torch.Generator().manual_seed(0)
    noise = -torch.empty(2, 5, captioner.vocab_size).exponential_(generator=draws).log()
    weights = torch.randn(6, captioner.vocab_size, generator=draws)

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)  # the same dropout masks in both runs
        image = pixels.clone().requires_grad_(True)
        probs, _ = captioner.gumbel_decode(image, max_length=5, temperature=1.0, gumbel_noise=noise)
        (probs * weights[: probs.shape[1]]).sum().backward()
        return probs.detach(), image.grad

    plain = decode()
    captioner.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = decode()
    assert torch.equal(plain[0], checkpointed[0])
    torch.testing.assert_close(checkpointed[1], plain[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_memorizes_six_captions_word_for_word(family_models, family: str) -> None:
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(str(family_models[family].captioner), max_length=16)
    captions = list(MEMORY)
    images = _solid_images(list(MEMORY.values()), captioner.image_size)
    tokens = captioner.tokenize(captions)
    optimizer = torch.optim.AdamW(captioner.model.parameters(), lr=3e-3, weight_decay=0.0)
    captioner.train()
    for _ in range(300):
        optimizer.zero_grad()
        captioner.caption_loss(images, **tokens).mean().backward()
        optimizer.step()
    captioner.eval()
    greedy = [options[0] for options in captioner.generate(images, num_beams=1)]
    beams = [options[0] for options in captioner.generate(images, num_beams=3)]
    assert greedy == captions
    assert beams == captions


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of two solid-colour images with captions (metadata.jsonl), and a prompts file of the same."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    rows = []
    for index, (caption, colour) in enumerate(list(MEMORY.items())[:2]):
        pixels = (_solid_images([colour])[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": caption}) + "\n")
    (root / "images" / "metadata.jsonl").write_text("".join(rows))
    (root / "prompts.txt").write_text("".join(f"{caption}\n" for caption in list(MEMORY)[:2]))
    return root / "images", root / "prompts.txt"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exported_adapter_loads_in_peft_and_changes_the_captions_and_every_cli_runs_on_it(
    family_models, inputs: tuple[Path, Path], tmp_path: Path, family: str
) -> None:
    output_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(family_models[family], output_dir),
        "captioner.optimizer.learning_rate=0.05",
        "train.max_train_steps=4",
        "train.checkpointing_steps=4",
    ]
    assert run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides]) == 0
    base = Captioner.from_pretrained(str(family_models[family].captioner))
    images = _solid_images(list(MEMORY.values()), base.image_size)
    before = base.generate(images)
    model_class = type(base.model)
    adapted = PeftModel.from_pretrained(
        model_class.from_pretrained(str(family_models[family].captioner)),
        str(RunDir(output_dir).export_dir / "captioner"),
    )
    adapted_captioner = Captioner(adapted.eval(), base.processor)
    after = adapted_captioner.generate(images)
    assert after != before
    # --merge: a standalone model that plain from_pretrained loads, deciding as the adapter does.
    merged_out = tmp_path / "merged"
    assert (
        export.main(["--checkpoint", str(output_dir / "checkpoint-4"), "--merge", "--out", str(merged_out)])
        == 0
    )
    merged = Captioner.from_pretrained(str(merged_out / "captioner_merged")).eval()
    tokens = merged.tokenize(list(MEMORY))
    with torch.no_grad():
        torch.testing.assert_close(
            merged.logits(images, **_inputs(tokens)),
            adapted_captioner.logits(images, **_inputs(tokens)),
            atol=1e-4,
            rtol=0,
        )

    export_dir = str(RunDir(output_dir).export_dir)
    images_dir, prompts = inputs
    out = tmp_path / "cli"
    common = ["--checkpoint", export_dir, "--batch-size", "2"]
    assert (
        generate.main(["captions", *common, "--images", str(images_dir), "--out", f"{out}/captions.jsonl"])
        == 0
    )
    captions = [json.loads(line)["captions"] for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 2 and all(len(row) == 1 for row in captions)
    ranked = ["--inference-steps", "2", *common]
    assert (
        rerank.main(
            ["captions", *ranked, "--images", str(images_dir), "--num-samples", "2", "--out", f"{out}/rc"]
        )
        == 0
    )
    assert (
        rerank.main(["images", *ranked, "--prompts", str(prompts), "--num-images", "2", "--out", f"{out}/ri"])
        == 0
    )
    for folder in ("rc", "ri"):
        assert (out / folder / "rankings.jsonl").read_text().strip()
    evaluated = ["--config", str(RunDir(output_dir).config_file), "--checkpoint", export_dir, "--limit", "2"]
    assert evaluate.main([*evaluated, "--metrics", "bleu_4,psnr", "--out", f"{out}/metrics.json"]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) >= {"bleu_4", "psnr"}
