"""The T2I2T reward mode's cider_d reward: CIDEr-D of the frozen captioner's greedy re-captions, its idf from the
training captions (evaluation's per_sample_cider with that corpus as the references), routing, per-sample
determinism, and the trainer's scorer and its start-up check (the recipe run: test_t2i2t_reward.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from cycle_runs import run_recipe_in_process, tiny_config, tiny_overrides
from lora_weights import perturb_lora

from cycletune.evaluation.captions import CorpusCider, per_sample_cider
from cycletune.losses.cycle_modes import CaptionScorer, CycleOutput, CycleStep
from cycletune.losses.t2i2t import T2I2T_MODES, T2I2TSettings
from cycletune.losses.t2i2t_reward import chain_rewards, sample_chains
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import add_generator_lora, frozen, prepare_trainable
from cycletune.models.randomness import DrawKey
from cycletune.train.builders import build_caption_scorer, check_caption_scorer, load_records
from cycletune.train.config import ConfigError

# The training captions: the idf corpus, one document each. The tiny captioner's re-captions end in "the red",
# so the red captions' rewards are above zero.
CORPUS = [
    "a red circle at the top",
    "a small blue square",
    "a large green triangle in the corner",
    "a red square at the bottom",
    "a blue circle on the left",
    "a small red triangle",
]
IDS = [f"sample-{index}" for index in range(len(CORPUS))]
# per_sample_cider's idf is its references': each corpus caption as a sample's one reference gives the corpus's.
CORPUS_AS_REFERENCES = {sample_id: [caption] for sample_id, caption in zip(IDS, CORPUS, strict=True)}
KEY = DrawKey(seed=0, step=3)
SETTINGS = T2I2TSettings(
    mode="reward", reward="cider_d", num_images=2, num_inference_steps=3, train_timesteps=0.5
)
CIDER_D = ["cycle.t2i2t.mode=reward", "cycle.t2i2t.reward=cider_d"]


@pytest.fixture(scope="module")
def corpus_cider() -> CorpusCider:
    return CorpusCider(CORPUS)


@pytest.fixture
def generator(generator: Generator) -> Generator:
    """The trainer's LoRA generator, its adapters perturbed so that the policy differs from the base."""
    add_generator_lora(generator, rank=4, alpha=4.0)
    perturb_lora(generator, prepare_trainable(generator, train_mode="lora"), seed=2, scale=0.1, replace=False)
    return generator


def _batch(rows: Sequence[int]) -> dict[str, Any]:
    return {"kind": "text_only", "ids": [IDS[row] for row in rows], "captions": [CORPUS[row] for row in rows]}


def _step(
    generator: Generator, captioner: Captioner, batch: dict[str, Any], scorer: CaptionScorer | None
) -> CycleStep[Generator, Captioner]:
    return CycleStep(generator, captioner, batch, KEY, caption_scorer=scorer)


def _run(
    generator: Generator, captioner: Captioner, batch: dict[str, Any], scorer: CaptionScorer | None
) -> CycleOutput:
    with frozen(captioner):
        return T2I2T_MODES.run(SETTINGS, _step(generator, captioner, batch, scorer))


def _rewards(
    generator: Generator, captioner: Captioner, batch: dict[str, Any], scorer: CaptionScorer
) -> torch.Tensor:
    """The mode's reward of each of the batch's chains, caption i's consecutive."""
    _, _, chain = sample_chains(generator, batch["captions"], batch["ids"], SETTINGS, KEY)
    repeated = [caption for caption in batch["captions"] for _ in range(SETTINGS.num_images)]
    step = _step(generator, captioner, batch, scorer)
    with frozen(captioner):
        return chain_rewards(step, SETTINGS, chain.latents[-1], repeated)


def _recaptions(generator: Generator, captioner: Captioner, batch: dict[str, Any]) -> list[str]:
    """The greedy re-caption of each chain's image, as evaluation decodes (num_beams 1, max_length tokens)."""
    _, _, chain = sample_chains(generator, batch["captions"], batch["ids"], SETTINGS, KEY)
    with torch.no_grad():
        pixels = generator.decode_latents(chain.latents[-1])
    return [texts[0] for texts in captioner.generate(pixels, num_beams=1)]


def test_corpus_cider_is_per_sample_cider_with_the_corpus_as_references(corpus_cider: CorpusCider) -> None:
    """Each score is the one evaluation's per_sample_cider gives with every corpus caption as a sample's
    reference (PTB tokenization included: case, punctuation, an empty caption), whichever captions are scored
    together; idf from the two scored references alone would give other values."""
    candidates = ["A red circle, at the top.", "a blue square", "", "a red triangle", "a small red triangle"]
    rows = [0, 1, 2, 5, 5]
    ours = corpus_cider(candidates, [CORPUS[row] for row in rows])
    per_reference: dict[str, list[str]] = {sample_id: [] for sample_id in IDS}
    for candidate, row in zip(candidates, rows, strict=True):
        per_reference[IDS[row]].append(candidate)
    expected = per_sample_cider(CORPUS_AS_REFERENCES, per_reference)
    assert ours == pytest.approx([score for row in (0, 1, 2, 5) for score in expected[IDS[row]]], abs=1e-12)
    assert ours[0] > 5 and ours[2] == 0 and ours[3] < ours[4]
    assert corpus_cider(candidates[1:2], CORPUS[1:2]) == ours[1:2], "a score depends on its pair alone"
    batch_idf = per_sample_cider({0: [CORPUS[0]], 1: [CORPUS[1]]}, {0: candidates[:1], 1: candidates[1:2]})
    assert [batch_idf[0][0], batch_idf[1][0]] != pytest.approx(ours[:2])


def test_a_scorer_that_has_scored_before_scores_alike(
    corpus_cider: CorpusCider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scorer's only state is its kept tokenizations (a resumed run starts without them): a fresh scorer
    gives the same values, and texts seen before skip the tokenizer's Java call."""
    candidates, references = ["a red circle at the top", "a green square"], CORPUS[:2]
    seen = corpus_cider(candidates, references)
    assert CorpusCider(CORPUS)(candidates, references) == seen

    def no_java(groups: Any) -> None:
        raise AssertionError(f"tokenized again: {groups}")

    monkeypatch.setattr("cycletune.evaluation.captions._ptb_tokenize", no_java)
    assert corpus_cider(candidates, references) == seen


def test_the_reward_is_the_corpus_cider_of_the_greedy_recaptions(
    generator: Generator, frozen_captioner: Captioner, corpus_cider: CorpusCider
) -> None:
    """Chain by chain, the reward equals per_sample_cider of the captioner's greedy re-caption against the
    training captions; the mode logs their mean."""
    batch = _batch([0, 1, 3])
    rewards = _rewards(generator, frozen_captioner, batch, corpus_cider)
    recaptions = _recaptions(generator, frozen_captioner, batch)
    candidates: dict[str, list[str]] = {sample_id: [] for sample_id in IDS}
    for index, recaption in enumerate(recaptions):
        candidates[batch["ids"][index // SETTINGS.num_images]].append(recaption)
    expected = per_sample_cider(CORPUS_AS_REFERENCES, candidates)
    flat = [score for sample_id in batch["ids"] for score in expected[sample_id]]
    torch.testing.assert_close(rewards, torch.tensor(flat, dtype=torch.float32))
    assert rewards.max() > 0
    output = _run(generator, frozen_captioner, batch, corpus_cider)
    torch.testing.assert_close(output.metrics["reward_mean"], rewards.mean())


def test_each_caption_gets_its_rewards_whatever_the_batch(
    generator: Generator, frozen_captioner: Captioner, corpus_cider: CorpusCider
) -> None:
    """Greedy re-captions draw nothing and the idf is the corpus's: a caption's rewards alone are the ones it
    gets in a batch, and again the same."""
    together = _rewards(generator, frozen_captioner, _batch([0, 3]), corpus_cider)
    alone = [_rewards(generator, frozen_captioner, _batch([row]), corpus_cider) for row in (0, 3)]
    assert torch.equal(together, torch.cat(alone))
    assert torch.equal(together, _rewards(generator, frozen_captioner, _batch([0, 3]), corpus_cider))


def test_only_the_generator_lora_learns_and_the_captioner_stays_as_it_was(
    generator: Generator, captioner: Captioner
) -> None:
    """The re-captions reach the scorer with their captions; the rewards it gives (distinct here, so the
    advantages are not zero) train the generator's LoRA alone, through no gradient of the captioner."""
    batch = _batch([0, 1])
    calls: list[tuple[list[str], list[str]]] = []

    def distinct_rewards(candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        calls.append((list(candidates), list(references)))
        return [float(index) for index in range(len(candidates))]

    before = {name: param.detach().clone() for name, param in captioner.named_parameters()}
    output = _run(generator, captioner, batch, distinct_rewards)
    output.loss.backward()
    assert calls == [(_recaptions(generator, captioner, batch), [CORPUS[0]] * 2 + [CORPUS[1]] * 2)]
    grads = {name: param.grad for name, param in generator.named_parameters() if param.grad is not None}
    assert set(grads) == {name for name, _ in generator.named_parameters() if "lora_" in name}
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    assert any(grad.abs().sum() > 0 for grad in grads.values())
    assert not [name for name, param in captioner.named_parameters() if param.grad is not None]
    assert all(torch.equal(param, before[name]) for name, param in captioner.named_parameters())


def test_without_a_scorer_the_mode_names_what_builds_it(
    generator: Generator, frozen_captioner: Captioner
) -> None:
    with pytest.raises(ValueError, match=r"reward='cider_d' needs the trainer's caption scorer"):
        _run(generator, frozen_captioner, _batch([0]), None)


def test_the_trainer_takes_the_idf_from_the_paired_and_text_only_captions(tiny_models) -> None:
    text_only = ("data.text_only=[{type: shapes, num_samples: 8, seed: 8}]", "data.text_only_ratio=0.5")
    config = tiny_config(tiny_models, *CIDER_D, *text_only)
    captions = [
        record.caption
        for role in ("paired", "text_only")
        for record in load_records(getattr(config.data, role), role, config.data.resolution)[0]
    ]
    assert len(captions) == 64 + 8
    candidates, references = ["a red circle", "a small blue square"], captions[:1] + captions[-1:]
    assert build_caption_scorer(config)(candidates, references) == CorpusCider(captions)(
        candidates, references
    )
    assert build_caption_scorer(tiny_config(tiny_models, "cycle.t2i2t.mode=reward")) is None


def test_the_trainer_refuses_cider_d_at_start_up_without_the_eval_extra(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pycocoevalcap made unimportable as the availability tests do: the recipe stops before loading
    anything, naming the key and the fix; the likelihood reward does not need it."""
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    overrides = [*tiny_overrides(tiny_models, tmp_path / "run"), *CIDER_D]
    assert run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides]) == 2
    error = capsys.readouterr().err
    assert "cycle.t2i2t.reward=cider_d" in error and "pip install 'cycletune[eval]'" in error, error
    assert not (tmp_path / "run").exists()
    assert check_caption_scorer(tiny_config(tiny_models, "cycle.t2i2t.mode=reward")) is False


def test_the_trainer_refuses_cider_d_without_java(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"reward=cider_d .* Java: install a Java runtime"):
        check_caption_scorer(tiny_config(tiny_models, *CIDER_D))
