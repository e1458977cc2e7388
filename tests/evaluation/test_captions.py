"""Caption metrics: pycocoevalcap's values on cases whose answer is known by hand."""

from __future__ import annotations

import math

import pytest

from cycletune.evaluation.captions import (
    CAPTION_METRICS,
    caption_metrics,
    per_sample_cider,
    spice_jars_missing,
)

CAPTIONS = {
    "dog": "a brown dog runs across the green park",
    "car": "a red car is parked beside a house",
    "pizza": "two friends share a large pizza at dinner",
}


@pytest.fixture(scope="module")
def identical_scores():
    """All metrics (METEOR's JVM takes seconds to start, so once) with each candidate equal to its reference."""
    references = {key: [caption.capitalize() + "."] for key, caption in CAPTIONS.items()}
    return caption_metrics(references, CAPTIONS)


def test_identical_captions_score_the_maximum(identical_scores) -> None:
    """Tokenization (case, final period) must not matter; each metric then reaches its maximum.

    CIDEr-D per sample is 10 * mean over n-gram orders of the clipped tf-idf cosine with each reference times a
    length penalty exp(-delta^2 / 2 sigma^2): an identical candidate has cosine 1 and delta 0, so 10, with one
    reference as well as with several identical ones. It needs every n-gram order to hold an n-gram that is
    not in all samples' references (else that order's idf weights are all zero and it contributes 0): here
    "a" is in all three captions and is weighted 0, yet each caption has other words, so 10 it is.
    """
    assert identical_scores["bleu_4"].value == pytest.approx(1.0, abs=1e-6)
    assert identical_scores["bleu_1"].value == pytest.approx(1.0, abs=1e-6)
    assert identical_scores["rouge_l"].value == pytest.approx(1.0)
    assert identical_scores["cider_d"].value == pytest.approx(10.0)
    assert identical_scores["meteor"].value == pytest.approx(1.0)
    assert list(identical_scores) == list(CAPTION_METRICS)


def test_spice_is_reported_unavailable_without_download(identical_scores) -> None:
    spice = identical_scores["spice"]
    assert spice_jars_missing(), "this environment has no CoreNLP jars; the test expects SPICE to be skipped"
    assert spice.skipped and spice.value is None
    assert spice.skipped_reason.startswith("spice skipped: SPICE needs Stanford CoreNLP 3.6.0")
    assert "stanford-corenlp-3.6.0-models.jar" in spice.skipped_reason


def test_bleu_matches_a_hand_computation() -> None:
    """Modified n-gram precisions with clipping, and the brevity penalty against the closest reference length.

    candidate (7 tokens): a black cat sits on a mat
    ref 1 (8 tokens):     a black cat sits on the red mat
    ref 2 (8 tokens):     there is a cat lying on the mat
    1-grams: "a" twice but at most once in any reference -> 1; black cat sits on mat -> 6/7
    2-grams: a black, black cat, cat sits, sits on match; on a, a mat do not -> 4/6
    3-grams: a black cat, black cat sits, cat sits on match; sits on a, on a mat do not -> 3/5
    4-grams: a black cat sits, black cat sits on match; cat sits on a, sits on a mat do not -> 2/4
    closest reference length 8 > 7, so brevity penalty exp(1 - 8/7).
    """
    references = {"cat": ["A black cat sits on the red mat.", "There is a cat lying on the mat!"]}
    candidates = {"cat": "A black cat, sits on a mat."}
    bleu_names = ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]
    scores = caption_metrics(references, candidates, metrics=bleu_names)
    precisions = [6 / 7, 4 / 6, 3 / 5, 2 / 4]
    brevity_penalty = math.exp(1 - 8 / 7)
    for n, name in enumerate(bleu_names, start=1):
        expected = brevity_penalty * math.prod(precisions[:n]) ** (1 / n)
        assert scores[name].value == pytest.approx(expected, rel=1e-6), name


def test_bleu_is_corpus_level() -> None:
    """BLEU pools n-gram counts over all samples (as COCO reports it), rather than averaging per-sample BLEU."""
    references = {"cat": ["a black cat sits on the mat"], "dog": ["a dog sleeps"]}
    candidates = {"cat": "a black cat sits on the mat", "dog": "a cat"}
    scores = caption_metrics(references, candidates, metrics=["bleu_1"])
    # 1-grams 7/7 and 1/2 pool to 8/9 (not the mean 3/4); candidate lengths 7 + 2 = 9 against
    # closest reference lengths 7 + 3 = 10 give one brevity penalty exp(1 - 10/9) for the corpus.
    assert scores["bleu_1"].value == pytest.approx(8 / 9 * math.exp(1 - 10 / 9), rel=1e-6)


def test_per_sample_cider_equals_a_whole_evaluation_of_each_round() -> None:
    references = {key: [caption] for key, caption in CAPTIONS.items()}
    candidates = {
        "dog": ["a brown dog runs across the green park", "a dog in a park"],
        "car": ["a car parked near a house", "a red car is parked beside a house", "a house"],
        "pizza": ["friends eat pizza"],
    }
    scores = per_sample_cider(references, candidates)
    assert [len(scores[key]) for key in CAPTIONS] == [2, 3, 1]
    assert scores["dog"][0] == pytest.approx(10.0)
    assert scores["car"][1] == pytest.approx(10.0)
    assert scores["dog"][1] < 10.0
    first_round = caption_metrics(
        references, {key: texts[0] for key, texts in candidates.items()}, ["cider_d"]
    )
    assert first_round["cider_d"].value == pytest.approx(sum(scores[key][0] for key in CAPTIONS) / 3)


def test_line_breaks_inside_captions_do_not_shift_other_samples() -> None:
    """A '\\r' inside a caption would become a line of its own for the Java tokenizer without normalisation."""
    references = {key: [caption] for key, caption in CAPTIONS.items()}
    candidates = {
        "dog": "a brown dog runs\racross the green park",
        "car": CAPTIONS["car"],
        "pizza": CAPTIONS["pizza"],
    }
    scores = per_sample_cider(references, {key: [text] for key, text in candidates.items()})
    assert [scores[key][0] for key in CAPTIONS] == pytest.approx([10.0, 10.0, 10.0])


def test_bad_input_is_named() -> None:
    references = {key: [caption] for key, caption in CAPTIONS.items()}
    with pytest.raises(ValueError, match=r"ids without a candidate: \['pizza'\]"):
        caption_metrics(references, {"dog": "a dog", "car": "a car"}, metrics=["bleu_4"])
    with pytest.raises(ValueError, match="references for id 'dog' is an empty list"):
        caption_metrics({**references, "dog": []}, CAPTIONS, metrics=["bleu_4"])
    with pytest.raises(TypeError, match="candidate caption for id 'car' must be a str"):
        caption_metrics(references, {**CAPTIONS, "car": ["a car"]}, metrics=["bleu_4"])
    with pytest.raises(ValueError, match="at least 2 samples"):
        per_sample_cider({"dog": [CAPTIONS["dog"]]}, {"dog": ["a dog"]})
    with pytest.raises(ValueError, match="unknown metric"):
        caption_metrics(references, CAPTIONS, metrics=["cider"])


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="install a Java runtime"):
        caption_metrics({"dog": [CAPTIONS["dog"]]}, {"dog": CAPTIONS["dog"]}, metrics=["bleu_4"])
