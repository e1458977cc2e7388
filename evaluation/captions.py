"""Caption metrics exactly as the COCO caption evaluation computes them, so numbers compare with papers.

pycocoevalcap does the work: the Stanford PTB tokenizer (lower-case, punctuation removed), BLEU-1..4 (corpus
level, "closest" reference length), METEOR 1.5, ROUGE-L, CIDEr-D (pycocoevalcap's `Cider` is CIDEr-D: clipped
n-gram counts and a Gaussian length penalty, scaled by 10) and SPICE. Scores keep pycocoevalcap's scale
(fractions; CIDEr-D in [0, 10]); papers print them multiplied by 100. pycocoevalcap is imported where it
is used: it belongs to the [eval] extra, and without it these metrics are skipped, not the run.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

from cycletune.evaluation.availability import MetricResult, MetricUnavailable, check_metric_names, prepare

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "spice")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

Tokenized = dict[Hashable, list[str]]
CaptionScorer = Callable[[Tokenized, Tokenized], dict[str, float]]


def caption_metrics(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    metrics: Sequence[str] = CAPTION_METRICS,
) -> dict[str, MetricResult]:
    """Score one candidate caption per sample id against that id's reference captions.

    SPICE is reported as skipped unless Stanford CoreNLP's jars already sit in pycocoevalcap's spice/lib:
    pycocoevalcap would otherwise download them (no timeout) the moment SPICE is constructed.
    """
    names = check_metric_names(metrics, CAPTION_METRICS)
    for sample_id, candidate in candidates.items():
        if not isinstance(candidate, str):
            raise TypeError(
                f"candidate caption for id {sample_id!r} must be a str, got {type(candidate).__name__}"
            )
    families = dict.fromkeys(_family(name) for name in names)
    scorers, skipped = prepare(families, _scorer)
    scores: dict[str, float] = {}
    if scorers:
        references_tokens, candidate_tokens = _tokenize_pairs(
            references, {key: [c] for key, c in candidates.items()}
        )
        for scorer in scorers.values():
            scores.update(scorer(references_tokens, candidate_tokens))
    results = {}
    for name in names:
        family = _family(name)
        if family in scorers:
            results[name] = MetricResult(name, scores[name])
        else:
            why = skipped[family].skipped_reason.partition(" skipped: ")[2]  # said of the family ("bleu")
            results[name] = MetricResult(name, None, f"{name} skipped: {why}")
    return results


def per_sample_cider(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, Sequence[str]]
) -> dict[Hashable, list[float]]:
    """CIDEr-D of every candidate of every sample, for rank analyses (several sampled captions per image).

    CIDEr-D's idf weights come from the reference corpus alone. Candidates are scored in rounds (round r holds
    each sample's r-th candidate), so every score equals the one a whole evaluation of that round would give,
    whatever the number of candidates per sample. Samples with fewer candidates get a placeholder in later
    rounds, whose score is dropped.
    """
    from pycocoevalcap.cider.cider import Cider

    _require_cider_corpus(len(references))
    references_tokens, candidate_tokens = _tokenize_pairs(references, candidates)
    scores: dict[Hashable, list[float]] = {key: [] for key in references_tokens}
    rounds = max(len(texts) for texts in candidate_tokens.values())
    for round_index in range(rounds):
        this_round = {
            key: [texts[round_index] if round_index < len(texts) else ""]
            for key, texts in candidate_tokens.items()
        }
        _, round_scores = Cider().compute_score(references_tokens, this_round)
        for key, score in zip(references_tokens, round_scores, strict=True):
            if round_index < len(candidate_tokens[key]):
                scores[key].append(float(score))
    return scores


class CorpusCider:
    """CIDEr-D of candidate captions against one reference caption each, its idf fixed by a caption corpus.

    Scored the usual way, one reference per candidate, CIDEr-D takes its document frequencies from the
    references scored together: a caption's score then depends on its batchmates, and alone every idf is
    zero. As in self-critical sequence training, the idf here comes once from a fixed corpus, one document
    per caption (the trainer gives it the training captions), so a score depends on its candidate and
    reference alone: the score per_sample_cider gives that candidate with the corpus as the references.
    Tokenized texts are kept (up to KEPT_TEXTS), so a text seen before skips the PTB tokenizer's Java call.
    """

    KEPT_TEXTS = 500_000

    def __init__(self, corpus: Sequence[str]) -> None:
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        _require_cider_corpus(len(corpus))
        self._tokens: dict[str, str] = {}
        counter = CiderScorer()
        for tokens in self._tokenize(corpus):
            counter += (None, [tokens])
        counter.compute_doc_freq()
        self._frequencies = _DocumentFrequencies(counter.document_frequency)
        self._log_documents = math.log(len(corpus))

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """CIDEr-D (pycocoevalcap's scale, 0 to 10) of each candidate against the reference at its index."""
        scorer = _fixed_idf_scorer_type()()
        scorer.document_frequency, scorer.log_documents = self._frequencies, self._log_documents
        for candidate, reference in zip(self._tokenize(candidates), self._tokenize(references), strict=True):
            scorer += (candidate, [reference])
        return [float(score) for score in scorer.compute_cider()]

    def _tokenize(self, texts: Sequence[str]) -> list[str]:
        _check_texts("captions to score", texts, allow_empty=True)
        new = list(dict.fromkeys(text for text in texts if text not in self._tokens))
        tokenized = _ptb_tokenize({index: [text] for index, text in enumerate(new)}) if new else {}
        found = {text: tokenized[index][0] for index, text in enumerate(new)}
        if len(self._tokens) + len(found) <= self.KEPT_TEXTS:
            self._tokens.update(found)
        return [found[text] if text in found else self._tokens[text] for text in texts]


class _DocumentFrequencies(dict):
    """Document counts by n-gram; an n-gram the corpus lacks counts 0 without being added, so scoring new
    captions never grows the table (pycocoevalcap's defaultdict would keep every n-gram it is asked about)."""

    def __missing__(self, ngram: tuple[str, ...]) -> float:
        return 0.0


@functools.cache
def _fixed_idf_scorer_type() -> type:
    """pycocoevalcap's CiderScorer with the corpus's document count kept: its compute_cider sets ref_len (the
    log document count in every idf) from the pairs it scores, so this subclass ignores that assignment.
    Built on first use: pycocoevalcap belongs to the [eval] extra."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    class FixedIdfScorer(CiderScorer):
        log_documents = 0.0

        @property
        def ref_len(self) -> float:
            return self.log_documents

        @ref_len.setter
        def ref_len(self, value: float | None) -> None:
            pass

    return FixedIdfScorer


def spice_jars_missing() -> list[Path]:
    """The CoreNLP jars SPICE needs that are absent from pycocoevalcap's spice/lib (empty when SPICE can run)."""
    import pycocoevalcap.spice

    lib = Path(pycocoevalcap.spice.__file__).parent / "lib"
    return [lib / jar for jar in SPICE_CORENLP_JARS if not (lib / jar).exists()]


def _require_cider_corpus(samples: int) -> None:
    """CIDEr-D's idf weights log(samples / document frequency) are all zero for one sample: every score is 0."""
    if samples < 2:
        raise ValueError(f"CIDEr-D needs references for at least 2 samples, got {samples}")


def _family(name: str) -> str:
    """BLEU-1..4 come from one computation; every other metric is its own."""
    return "bleu" if name.startswith("bleu_") else name


def _scorer(family: str) -> CaptionScorer:
    import pycocoevalcap  # noqa: F401  (absent without the [eval] extra: prepare() then skips the metric)

    if family == "spice":
        missing = spice_jars_missing()
        if missing:
            raise MetricUnavailable(
                f"SPICE needs Stanford CoreNLP 3.6.0, and {', '.join(str(path) for path in missing)} "
                "is absent; copy those jars there from stanford-corenlp-full-2015-12-09.zip "
                "(CycleTune never downloads them)"
            )
    return _SCORERS[family]


def _bleu(references: Tokenized, candidates: Tokenized) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu

    scores, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    return {f"bleu_{n}": float(score) for n, score in enumerate(scores, start=1)}


def _meteor(references: Tokenized, candidates: Tokenized) -> dict[str, float]:
    from pycocoevalcap.meteor.meteor import Meteor

    score, _ = Meteor().compute_score(references, candidates)
    return {"meteor": float(score)}


def _rouge_l(references: Tokenized, candidates: Tokenized) -> dict[str, float]:
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(references, candidates)
    return {"rouge_l": float(score)}


def _cider_d(references: Tokenized, candidates: Tokenized) -> dict[str, float]:
    from pycocoevalcap.cider.cider import Cider

    _require_cider_corpus(len(references))
    score, _ = Cider().compute_score(references, candidates)
    return {"cider_d": float(score)}


def _spice(references: Tokenized, candidates: Tokenized) -> dict[str, float]:
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(references, candidates)
    return {"spice": float(score)}


_SCORERS: dict[str, CaptionScorer] = {
    "bleu": _bleu,
    "meteor": _meteor,
    "rouge_l": _rouge_l,
    "cider_d": _cider_d,
    "spice": _spice,
}


def _tokenize_pairs(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, Sequence[str]]
) -> tuple[Tokenized, Tokenized]:
    """Check both sides cover the same ids, then PTB-tokenize them in one Java call (each call costs ~0.5 s)."""
    _check_same_ids(references, candidates)
    for key, texts in references.items():
        _check_texts(f"references for id {key!r}", texts, allow_empty=False)
    for key, texts in candidates.items():
        _check_texts(f"candidates for id {key!r}", texts, allow_empty=True)
    tokenized = _ptb_tokenize(
        {("reference", key): texts for key, texts in references.items()}
        | {("candidate", key): texts for key, texts in candidates.items()}
    )
    return (
        {key: tokenized[("reference", key)] for key in references},
        {key: tokenized[("candidate", key)] for key in candidates},
    )


def _check_same_ids(references: Mapping[Hashable, object], candidates: Mapping[Hashable, object]) -> None:
    if not references:
        raise ValueError("no samples to score: references is empty")
    without_candidate = [key for key in references if key not in candidates]
    without_reference = [key for key in candidates if key not in references]
    if without_candidate or without_reference:
        raise ValueError(
            "references and candidates must cover the same sample ids; "
            f"ids without a candidate: {without_candidate[:5]}, ids without references: {without_reference[:5]}"
        )


def _check_texts(what: str, texts: Sequence[str], *, allow_empty: bool) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not texts and not allow_empty:
        raise ValueError(f"{what} is an empty list")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"{what} holds a {type(text).__name__}, expected str: {text!r}")


def _ptb_tokenize(groups: Mapping[Hashable, Sequence[str]]) -> Tokenized:
    """Tokenize as the COCO evaluation does, with whitespace collapsed first.

    pycocoevalcap replaces only '\\n' before handing one caption per line to Java; a '\\r' or other line
    separator inside a caption would split it into two lines and shift every later caption onto the wrong id.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics run pycocoevalcap's Java tools (PTB tokenizer, METEOR, SPICE): "
            "install a Java runtime and put `java` on PATH"
        )
    tokenizer_folder = Path(ptbtokenizer.__file__).parent
    if not os.access(tokenizer_folder, os.W_OK):
        raise RuntimeError(
            f"pycocoevalcap's PTB tokenizer writes its input file into {tokenizer_folder}, which is read-only"
        )
    captions = {key: [{"caption": " ".join(text.split())} for text in texts] for key, texts in groups.items()}
    tokenized = ptbtokenizer.PTBTokenizer().tokenize(captions)
    return {key: tokenized.get(key, []) for key in groups}
