"""Vocabulary bridge: a captioner's SOFT token distributions -> token embeddings for a frozen CLIP or T5.

The image->text->image cycle lets the generator read a caption the captioner has not committed to: one
probability distribution over the captioner's vocabulary per position. The two models tokenize differently
(BLIP, GIT: BERT WordPiece; BLIP-2 OPT, SmolVLM: byte-level BPE; IDEFICS: SentencePiece BPE; Stable Diffusion:
CLIP's BPE, 49,408 tokens; SD3 and Flux also read T5's SentencePiece Unigram, 32,100 tokens), so every
captioner token gets a fixed recipe of generator tokens, and a position's embedding is the
probability-weighted sum of its tokens' recipes, read from the text encoder's CURRENT embedding matrix.

Mapping rules
- Reading (models/token_pieces.py): each tokenizer kind's word marker turns a token string into text and says
  whether it continues the word before it. WordPiece: "##" continues. Byte-level BPE ("Ġ") and SentencePiece
  ("▁"): the marker starts a word and a piece without it continues, unless the generator's pre-tokenizer
  would split it off anyway (",", ".", a digit, "'s" after a word: "dog," is "dog</w>" ",</w>" in CLIP).
  CLIP BPE ("</w>" ends a word, the identity bridge): the token's own finality. Byte pieces that are not whole
  UTF-8 and <0xNN> byte fallbacks other than printable ASCII have no text: unmappable.
- The text (the generator tokenizer's normaliser and pre-tokenizer: CLIP's NFC, lower case, byte-level
  alphabet; T5's NFKC, case kept) maps to the generator token with the same string plus the generator's word
  marker or without it: an exact match. CLIP marks a word's END ("dog</w>"), T5 its START ("▁dog").
- Each captioner token has two recipes, "final" and "inner", and position i mixes them as
  (1 - q_i) * final + q_i * inner; the target kind decides what they are and what q_i is.
  CLIP: whether a token ends its word depends on the NEXT position, a following continuation makes it
  word-inner. final = with "</w>", inner = without, q_i = the probability mass of continuing tokens at
  position i + 1 (0 after the last valid position). A CLIP-BPE source carries finality in its own token
  strings, so its two recipes coincide.
  T5: whether a token starts a word is its OWN flag ("##s", a "Ġ"-less byte piece continue), except that the
  text's first word always starts with "▁" (T5 prepends it). inner = the token as read inside the text: "▁"
  unless it continues, final = with "▁"; q_i = 1, but 0 at the first caption position. A CLIP-BPE source is
  refused: where its words start depends on the token before.
- A token with no exact match maps to the MEAN embedding of the pieces the generator's own subword model
  splits it into (CLIP's inner recipe leaves "</w>" off the last piece, T5's leaves "▁" off the first): one
  captioner position stays one position, and nothing collapses onto [UNK] (the paper's exact-match-or-[UNK]
  table lost 58% of CLIP's vocabulary).
- Special tokens: bos and [CLS] -> CLIP's bos "<|startoftext|>" (T5 has no bos: nothing, a zero embedding,
  counted as unmapped mass); eos, [SEP] and the captioner's caption-end token -> the eos "<|endoftext|>" or
  "</s>" (eos wins where one token plays both, like OPT's "</s>": inside a caption it can only end it); [PAD]
  -> the generator tokenizer's pad token; [UNK], every other special ([MASK], image placeholders) and
  unmappable tokens -> the generator's unk token. Added tokens that are not special are read by their text,
  as a word of their own. Also unmappable: BERT's "[unused17]" placeholders (the captioner's own
  pre-tokenizer splits them, so no text ever yields them), whitespace-only pieces and characters outside the
  generator's alphabet.
- Positions: probs[:, 0] is the start slot (BLIP's "[DEC]", or the last token of a prompt or a chat turn
  header, e.g. ":" of "Assistant:", an ordinary token elsewhere), so whatever its distribution it becomes the
  exact bos embedding as CLIP's tokenizer starts every text, and is dropped for T5, which starts with the
  caption. Positions beyond the attention mask get the pad embedding. The output has max_length positions
  (77 for SD's CLIP, 256 or 512 for T5): a longer caption is truncated with eos in the last slot, as both
  tokenizers truncate; a shorter one is padded.
- Storage: recipes are [V_source, P] index and weight tables (P = most pieces of any token; unused slots
  weigh 0), never a dense [V_source, V_target] matrix (30k x 49k floats would be 6 GB). `embed` turns them
  into a [V_source, 2 * D] table of final and inner embeddings with one embedding_bag per call, so an
  embedding matrix that trains is followed, and multiplies the probabilities by it.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cycletune.models.token_pieces import Reading, TargetPieces, added_beyond_model, source_reader

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _special_recipes(
    source: PreTrainedTokenizerBase,
    target: PreTrainedTokenizerBase,
    added_special: set[int],
    end_token_id: int | None,
) -> dict[int, list[int] | None]:
    """Source special-token id -> target recipe by role; None: no counterpart (maps to the target's unk);
    []: bos into a target without one (T5), which has nothing to stand for it."""
    required = {"eos": target.eos_token_id, "pad": target.pad_token_id, "unk": target.unk_token_id}
    missing = [role for role, token_id in required.items() if token_id is None]
    if missing:
        raise ValueError(f"generator tokenizer has no {', '.join(missing)} token")
    roles = {
        "bos": [] if target.bos_token_id is None else [target.bos_token_id],
        "eos": [target.eos_token_id],
        "pad": [target.pad_token_id],
    }
    targets: dict[int, list[int] | None] = dict.fromkeys([*source.all_special_ids, *added_special])
    # Later roles win where one token plays several: a source eos that is also its bos or pad (OPT's "</s>",
    # GPT-2's pad) ends a caption wherever it has mass, since position 0 is bos or dropped regardless.
    for source_ids, recipe in (
        ((source.pad_token_id,), roles["pad"]),
        ((source.cls_token_id, source.bos_token_id), roles["bos"]),
        ((source.sep_token_id, source.eos_token_id, end_token_id), roles["eos"]),
    ):
        targets.update((token_id, recipe) for token_id in source_ids if token_id is not None)
    return targets


def _recipe_table(recipes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged recipes -> [V, P] indices and mean weights (1 / pieces), padded with index 0, weight 0 (an empty
    recipe weighs nothing: a zero embedding)."""
    lengths = torch.tensor([len(recipe) for recipe in recipes])
    rows = torch.repeat_interleave(torch.arange(len(recipes)), lengths)
    columns = torch.arange(len(rows)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    index = torch.zeros(len(recipes), int(lengths.max()), dtype=torch.long)
    weight = torch.zeros(index.shape, dtype=torch.float32)
    index[rows, columns] = torch.tensor(list(chain.from_iterable(recipes)), dtype=torch.long)
    weight[rows, columns] = 1.0 / lengths[rows].float()
    return index, weight


class VocabularyBridge(nn.Module):
    """Fixed captioner-token -> generator-token recipes; `embed` maps soft captions to token embeddings."""

    def __init__(
        self,
        *,
        final_recipes: list[list[int]],
        inner_recipes: list[list[int]],
        continuation: list[bool],
        unmapped: list[bool],
        bos_id: int | None,
        pad_id: int,
        eos_id: int,
        marks_word_end: bool,
        max_length: int,
        coverage: dict[str, float],
    ) -> None:
        """`bos_id` None: the target starts with the caption (T5). `marks_word_end`: CLIP's "</w>" (the next
        position picks the inner recipe) rather than T5's "▁" (every position but the first reads inner)."""
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for a caption's first position and eos")
        self.source_vocab_size = len(final_recipes)
        self.bos_id, self.pad_id, self.eos_id, self.max_length = bos_id, pad_id, eos_id, max_length
        self.marks_word_end = marks_word_end
        self._coverage = dict(coverage)
        # Rebuilt from the tokenizers by `build`, so kept out of checkpoints (persistent=False).
        for name, recipes in (("final", final_recipes), ("inner", inner_recipes)):
            index, weight = _recipe_table(recipes)
            self.register_buffer(f"{name}_index", index, persistent=False)
            self.register_buffer(f"{name}_weight", weight, persistent=False)
        self.register_buffer(
            "continuation", torch.tensor(continuation, dtype=torch.float32), persistent=False
        )
        self.register_buffer("unmapped", torch.tensor(unmapped, dtype=torch.float32), persistent=False)

    @classmethod
    def build(
        cls,
        captioner_tokenizer: PreTrainedTokenizerBase,
        generator_tokenizer: PreTrainedTokenizerBase,
        *,
        end_token_id: int | None = None,
        max_length: int = 77,
        source_vocab_size: int | None = None,
    ) -> VocabularyBridge:
        """Read both vocabularies in one pass (CPU seconds on one core: about 1 for BERT's 30k WordPiece ->
        CLIP's 49k BPE, about 4 for a 150k byte-level vocabulary).

        `end_token_id`: the token that ends the captioner's captions (e.g. BLIP-2 OPT's "Ċ"), mapped to the
        generator's eos like the captioner's own eos. `source_vocab_size` is the captioner's logit count when its embedding matrix is
        padded beyond the tokenizer (common: sizes rounded up to a multiple of 64); those ids have no text
        and stay unmapped.
        """
        source_size = len(captioner_tokenizer) if source_vocab_size is None else source_vocab_size
        if source_size < len(captioner_tokenizer):
            raise ValueError(
                f"source_vocab_size={source_size} is smaller than the captioner tokenizer "
                f"({len(captioner_tokenizer)} tokens)"
            )
        if end_token_id is not None and not 0 <= end_token_id < source_size:
            raise ValueError(
                f"end_token_id {end_token_id} is outside the captioner vocabulary [0, {source_size})"
            )
        target = TargetPieces(generator_tokenizer)
        read = source_reader(captioner_tokenizer, target)
        added_special, added_text = added_beyond_model(captioner_tokenizer)
        specials = _special_recipes(captioner_tokenizer, generator_tokenizer, added_special, end_token_id)
        unk_id: int = generator_tokenizer.unk_token_id
        final_recipes: list[list[int]] = []
        inner_recipes: list[list[int]] = []
        continuation, unmapped = [False] * source_size, [False] * source_size
        token_strings = captioner_tokenizer.convert_ids_to_tokens(list(range(len(captioner_tokenizer))))
        token_strings += [None] * (source_size - len(captioner_tokenizer))
        for token_id, token in enumerate(token_strings):
            if token_id in specials or token is None:  # None: an id the tokenizer has no string for
                recipe = specials.get(token_id)
                unmapped[token_id] = not recipe
                final_recipes.append([unk_id] if recipe is None else recipe)
                inner_recipes.append(final_recipes[-1])
                continue
            if token_id in added_text:  # matched whole, before any subword rule: a word of its own
                reading = Reading(target.words(added_text[token_id]), "by_context", False)
            else:
                reading = read(token)
            continuation[token_id] = reading.continues_word
            # Inside a caption CLIP's "</w>" stays unless the NEXT token continues (`embed` mixes that in);
            # T5's "▁" stays unless the token itself continues the word before it.
            inner_marked = (
                reading.finality == "final" if target.marks_word_end else not reading.continues_word
            )
            final = target.pieces(reading.words, marked=reading.finality != "inner")
            inner = target.pieces(reading.words, marked=inner_marked)
            unmapped[token_id] = final is None or inner is None
            final_recipes.append([unk_id] if unmapped[token_id] else final)
            inner_recipes.append([unk_id] if unmapped[token_id] else inner)
        coverage = _coverage(
            final_recipes, inner_recipes, unmapped, set(specials), target_size=len(generator_tokenizer)
        )
        return cls(
            final_recipes=final_recipes,
            inner_recipes=inner_recipes,
            continuation=continuation,
            unmapped=unmapped,
            bos_id=generator_tokenizer.bos_token_id,
            pad_id=generator_tokenizer.pad_token_id,
            eos_id=generator_tokenizer.eos_token_id,
            marks_word_end=target.marks_word_end,
            max_length=max_length,
            coverage=coverage,
        )

    def coverage(self) -> dict[str, float]:
        """How the vocabularies meet, both ways (shares in [0, 1]).

        source_exact / source_pieces / source_unk: regular (non-special) captioner tokens whose final
        recipe (CLIP: word-final, T5: starting a word) is one generator token / a mean of several / the unk
        token; source_inner_exact and source_inner_pieces: the same for the inner recipe (CLIP: word-inner,
        T5: read inside the text; its unk share equals source_unk); target_reached: generator tokens that some
        mapped recipe (specials included) uses.
        """
        return dict(self._coverage)

    def embed(
        self, probs: torch.Tensor, attention_mask: torch.Tensor, token_embedding: nn.Embedding
    ) -> torch.Tensor:
        """probs [B, L, V_source] -> token embeddings [B, max_length, D], differentiable w.r.t. probs.

        No position embeddings: the generator's `encode_token_embeddings` runs its encoder on the result. Computed in at least float32
        (a 30k-way sum in bf16 is coarse; float64 stays float64 for gradcheck) and returned in the
        embedding's dtype.
        """
        valid = self._check_inputs(probs, attention_mask)
        embedding_weight = token_embedding.weight
        dtype = torch.promote_types(torch.promote_types(probs.dtype, embedding_weight.dtype), torch.float32)
        # Position 0 is the start slot, whose token means nothing to the generator: bos or dropped below.
        caption, weight = probs[:, 1:].to(dtype), embedding_weight.to(dtype)
        if self.marks_word_end:
            continuation_mass = caption[:, 1:] @ self.continuation.to(dtype)
            inner_share = F.pad(continuation_mass * valid[:, 2:], (0, 1))
        else:  # every caption position but the first, which starts the text's first word
            inner_share = F.pad(valid[:, 2:].to(dtype), (1, 0))
        inner_share = inner_share.unsqueeze(-1)
        final, inner = (caption @ self._recipe_embeddings(weight)).chunk(2, dim=-1)
        # (1 - q) * final + q * inner is exact at q = 0 and q = 1, so one-hot input reproduces hard tokens.
        mixed = (1 - inner_share) * final + inner_share * inner
        if self.bos_id is None:
            embeds, valid = mixed, valid[:, 1:]
        else:
            embeds = torch.cat([weight[self.bos_id].expand(len(probs), 1, -1), mixed], dim=1)
        return self._fit_length(embeds, valid, weight).to(embedding_weight.dtype)

    @torch.no_grad()
    def mass_coverage(self, probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Share of the batch's probability mass (valid positions) on tokens that map to what they mean (not
        to unk, nor to nothing as a bos does into T5).

        The start slot (position 0) always becomes bos or is dropped, so its mass counts as mapped. A 0-dim
        tensor, detached, computed without boolean indexing (which would wait for the GPU).
        """
        valid = self._check_inputs(probs, attention_mask)
        probs = probs.detach().to(torch.promote_types(probs.dtype, torch.float32))
        weights = valid.to(probs.dtype)
        unk_mass = ((probs[:, 1:] @ self.unmapped.to(probs.dtype)) * weights[:, 1:]).sum()
        return 1 - unk_mass / (probs.sum(dim=-1) * weights).sum()

    def _check_inputs(self, probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shape checks; the mask as bools."""
        if probs.ndim != 3 or probs.shape[-1] != self.source_vocab_size:
            raise ValueError(
                f"probs must be [B, L, {self.source_vocab_size}] (the captioner vocabulary the bridge was "
                f"built for), got {tuple(probs.shape)}"
            )
        if tuple(attention_mask.shape) != tuple(probs.shape[:2]):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} != probs[:2] {tuple(probs.shape[:2])}"
            )
        valid = attention_mask.bool()
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded: ones, then zeros")
        return valid

    def _recipe_embeddings(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        """[V_source, 2 * D]: each token's word-final recipe embedding, then its word-inner one."""
        return torch.cat(
            [
                F.embedding_bag(
                    index, embedding_weight, per_sample_weights=weight.to(embedding_weight.dtype), mode="sum"
                )
                for index, weight in (
                    (self.final_index, self.final_weight),
                    (self.inner_index, self.inner_weight),
                )
            ],
            dim=1,
        )

    def _fit_length(
        self, embeds: torch.Tensor, valid: torch.Tensor, embedding_weight: torch.Tensor
    ) -> torch.Tensor:
        """Pad or truncate to max_length like CLIP's and T5's tokenizers: pad rows past the mask, eos kept on
        cut."""
        length, max_length = embeds.shape[1], self.max_length
        overflows = valid.sum(dim=1) > max_length
        if length < max_length:
            embeds = F.pad(embeds, (0, 0, 0, max_length - length))
            valid = F.pad(valid, (0, max_length - length))
        embeds, valid = embeds[:, :max_length], valid[:, :max_length]
        embeds = torch.where(valid.unsqueeze(-1), embeds, embedding_weight[self.pad_id])
        last_slot = torch.arange(max_length, device=embeds.device) == max_length - 1
        eos_slots = overflows.unsqueeze(1) & last_slot
        return torch.where(eos_slots.unsqueeze(-1), embedding_weight[self.eos_id], embeds)


def _coverage(
    final_recipes: list[list[int]],
    inner_recipes: list[list[int]],
    unmapped: list[bool],
    special_ids: set[int],
    *,
    target_size: int,
) -> dict[str, float]:
    """The shares `VocabularyBridge.coverage` reports, computed once from the recipes."""
    regular = [token_id for token_id in range(len(final_recipes)) if token_id not in special_ids]
    mapped = [token_id for token_id in regular if not unmapped[token_id]]
    count = max(len(regular), 1)
    shares = {"source_unk": (len(regular) - len(mapped)) / count}
    for name, recipes in (("source", final_recipes), ("source_inner", inner_recipes)):
        exact = sum(len(recipes[token_id]) == 1 for token_id in mapped)
        shares[f"{name}_exact"] = exact / count
        shares[f"{name}_pieces"] = (len(mapped) - exact) / count
    reached = {
        piece
        for token_id in range(len(final_recipes))
        if not unmapped[token_id]
        for piece in (*final_recipes[token_id], *inner_recipes[token_id])
    }
    shares["target_reached"] = len(reached) / target_size
    return shares


def describe_coverage(coverage: dict[str, float]) -> str:
    """VocabularyBridge.coverage as one line for a log, both directions named."""
    return (
        f"captioner tokens -> generator: exact {coverage['source_exact']:.1%}, mean of pieces "
        f"{coverage['source_pieces']:.1%}, unk {coverage['source_unk']:.1%} (word-inner exact "
        f"{coverage['source_inner_exact']:.1%}); generator tokens reached {coverage['target_reached']:.1%}"
    )


def pair_coverage(
    captioner_tokenizer: PreTrainedTokenizerBase, generator_tokenizer: PreTrainedTokenizerBase
) -> dict[str, float]:
    """`VocabularyBridge.coverage` of a captioner -> generator tokenizer pair, e.g. to quote per family."""
    return VocabularyBridge.build(captioner_tokenizer, generator_tokenizer).coverage()
