"""Text reconstruction metrics: the packaged SBERT, CLIP text encoders from local folders, re-caption CIDEr-D."""

from __future__ import annotations

import pytest
import torch

from cycletune.evaluation.text import (
    TextMetricOptions,
    clip_text_embedder,
    load_clip_text_encoder,
    load_sbert,
    recaption_cider,
    text_metrics,
    text_similarity,
)

DOG = "a dog is running across the grass"
PARAPHRASE = "a puppy runs over a lawn"
UNRELATED = "the stock market fell sharply today"


@pytest.fixture(scope="module")
def sbert():
    return load_sbert()


def test_sbert_ranks_a_paraphrase_above_an_unrelated_sentence(sbert) -> None:
    similarity = text_similarity(sbert, batch_size=2)
    same, paraphrase, unrelated = similarity([DOG, DOG, DOG], [DOG, PARAPHRASE, UNRELATED]).tolist()
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > unrelated + 0.3


def test_text_metrics_average_each_pair(sbert) -> None:
    texts, recaptions = [DOG, UNRELATED], [PARAPHRASE, UNRELATED]
    results = text_metrics(
        texts, recaptions, TextMetricOptions(sbert_model=sbert), ["sbert_similarity", "cider_d"]
    )
    pair_scores = text_similarity(sbert)(texts, recaptions)
    assert results["sbert_similarity"].value == pytest.approx(float(pair_scores.mean()), rel=1e-5)
    assert results["cider_d"].value == pytest.approx(float(recaption_cider(texts, recaptions).mean()))


def test_recaption_cider_is_ten_for_an_exact_recaption() -> None:
    scores = recaption_cider([DOG, UNRELATED, PARAPHRASE], [DOG, UNRELATED, "a cat sleeps"])
    assert scores.tolist()[:2] == pytest.approx([10.0, 10.0])
    assert scores[2] < 1.0


def test_clip_text_similarity_with_the_generators_own_text_encoder(tiny_models) -> None:
    """A diffusers folder is read as its text_encoder/ and tokenizer/: the pooled CLIPTextModel output."""
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder = load_clip_text_encoder(tiny_models.generator)
    text_model = CLIPTextModel.from_pretrained(tiny_models.generator / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.generator / "tokenizer")
    expected = clip_text_embedder(text_model, tokenizer)([DOG, PARAPHRASE])
    with torch.no_grad():
        single = text_model(**tokenizer([DOG], return_tensors="pt")).pooler_output
    assert torch.allclose(encoder([DOG, PARAPHRASE]), expected, atol=1e-5)
    assert torch.allclose(expected[:1], single, atol=1e-5), (
        "padding a batch must not change a text's embedding"
    )
    options = TextMetricOptions(clip_text_encoder=tiny_models.generator)
    same = text_metrics([DOG, UNRELATED], [DOG, UNRELATED], options, ["clip_text_similarity"])
    different = text_metrics([DOG, UNRELATED], [UNRELATED, DOG], options, ["clip_text_similarity"])
    assert same["clip_text_similarity"].value == pytest.approx(1.0, abs=1e-5)
    assert different["clip_text_similarity"].value < 1 - 1e-4


def test_clip_text_from_a_whole_clip_checkpoint_is_projected(tiny_clip_folder) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(tiny_clip_folder).eval()
    tokens = CLIPTokenizer.from_pretrained(tiny_clip_folder)([DOG], return_tensors="pt")
    with torch.no_grad():
        expected = clip.text_projection(clip.text_model(**tokens).pooler_output)
    embedded = load_clip_text_encoder(tiny_clip_folder)([DOG])
    assert embedded.shape == (1, 16)
    assert torch.allclose(embedded, expected, atol=1e-5)


def test_bad_text_input_is_named() -> None:
    with pytest.raises(ValueError, match="2 texts but 1 recaptions"):
        text_metrics([DOG, UNRELATED], [DOG], metrics=["cider_d"])
    with pytest.raises(TypeError, match=r"recaptions\[1\] is a NoneType"):
        text_metrics([DOG, UNRELATED], [DOG, None], metrics=["cider_d"])
    with pytest.raises(TypeError, match="single str"):
        text_metrics(DOG, DOG, metrics=["cider_d"])
