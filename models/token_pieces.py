"""Token strings read as text, for the vocabulary bridge (models/bridge.py): one reader per subword convention.

A source (captioner) token becomes the words the target (generator) tokenizer's pre-tokenizer sees, plus
what decides whether it ends a word. The kinds differ in where the word boundary is marked:
- WordPiece (BERT: BLIP, GIT): "##" marks a word-INNER continuation; a token without it starts a word.
- Byte-level BPE (GPT-2, OPT, SmolVLM): "Ġ" (the byte-alphabet space) STARTS a word; a piece is bytes spelt
  in GPT-2's byte alphabet, decoded to UTF-8 text (a piece that is not whole UTF-8 has no text).
- SentencePiece BPE or Unigram (Llama, IDEFICS, T5): "▁" STARTS a word; <0xNN> byte-fallback pieces are one
  byte each, read as that character when it is printable ASCII and as no text otherwise (a lone byte of a
  UTF-8 sequence).
- CLIP's BPE: "</w>" ENDS a word, so a token's finality is its own (the identity bridge).
For the start-marker kinds, a piece without the marker continues the word before it, except where the target's
pre-tokenizer would split it off anyway: a piece whose first character does not join a preceding letter
("," or "." after a word, a digit, "'s" after a word: CLIP splits them off; T5 splits only at spaces) starts
its own target word. Byte-level BPE writes a text's first word without "Ġ", so it "continues" the caption's
start slot, which the bridge drops or replaces by bos anyway.

Targets (TargetPieces) come in two kinds: CLIP's BPE marks a word's END ("</w>" on its last piece), T5's
SentencePiece Unigram its START ("▁" before its first piece; no bos). A recipe is "marked" where it carries
the marker on the word its context decides (CLIP: the token's last word; T5: its first), "unmarked" without.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Literal, NamedTuple

from tokenizers import Tokenizer
from tokenizers.models import BPE, Unigram, WordPiece
from transformers.convert_slow_tokenizer import bytes_to_unicode

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase

Finality = Literal["by_context", "final", "inner"]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "▁"
# A letter the target pre-tokenizer keeps in one word with the letters after it: the probe for "joins".
_WORD_PROBE = "a"


class Reading(NamedTuple):
    """A source token as the target's words, and what decides whether it ends a word."""

    words: tuple[str, ...]  # the target pre-tokenizer's words, in its byte alphabet; empty: unmappable
    finality: Finality  # "by_context": the bridge decides by position; else fixed by the token itself (CLIP)
    continues_word: bool  # joins the word before: CLIP's previous position loses "</w>", T5's token its "▁"


def backend_of(tokenizer: PreTrainedTokenizerBase, role: str) -> Tokenizer:
    """The `tokenizers` object behind a transformers tokenizer: it exposes the model, merges and markers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(
            f"{role} tokenizer {type(tokenizer).__name__} has no `tokenizers` backend (backend_tokenizer); "
            "the bridge reads subword markers and BPE merges from it"
        )
    return backend


class TargetPieces:
    """The generator tokenizer's pieces for a text: an exact vocabulary match, else its subword model's."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = backend_of(tokenizer, "generator")
        model = backend.model
        self.vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        self.unk_id: int | None = tokenizer.unk_token_id
        self.normalizer = backend.normalizer
        self.pre_tokenizer = backend.pre_tokenizer
        if isinstance(model, BPE) and model.end_of_word_suffix:
            self.marks_word_end, self.prefix, self.suffix = True, "", model.end_of_word_suffix
            # The same merges without the end-of-word suffix give the pieces of a word that continues.
            config = json.loads(backend.to_str())
            config["model"]["end_of_word_suffix"] = None
            self._models = {True: model, False: Tokenizer.from_str(json.dumps(config)).model}
        elif isinstance(model, Unigram) and self._starts_every_word_with_space_marker():
            # Unigram scores whole strings: "▁" is part of the text it segments, so one model serves both.
            self.marks_word_end, self.prefix, self.suffix = False, _SENTENCEPIECE_SPACE, ""
            self._models = {True: model, False: model}
        else:
            raise ValueError(
                f"generator tokenizer {type(tokenizer).__name__} must be a BPE marking word ends with a "
                f"suffix like CLIP's '</w>' or a SentencePiece Unigram whose pre-tokenizer starts every word "
                f"with '{_SENTENCEPIECE_SPACE}' like T5's; got {type(model).__name__} with pre-tokenizer "
                f"{self.pre_tokenizer}"
            )
        # Memos: real vocabularies repeat words across case and space variants ("Ġdog", "Dog", "▁DOG").
        self._pieces: dict[tuple[tuple[str, ...], bool], list[int] | None] = {}
        self._joins: dict[str, bool] = {}

    def _starts_every_word_with_space_marker(self) -> bool:
        """T5's Metaspace pre-tokenizer puts "▁" before every word, the text's first included."""
        if self.pre_tokenizer is None:
            return False
        probe = [word for word, _ in self.pre_tokenizer.pre_tokenize_str("a b")]
        return probe == [_SENTENCEPIECE_SPACE + "a", _SENTENCEPIECE_SPACE + "b"]

    def words(self, text: str) -> tuple[str, ...]:
        """Text -> the words the subword model sees, without a start marker: normalised, split like the
        tokenizer splits, in its byte alphabet."""
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        if self.pre_tokenizer is None:
            return (text,) if text else ()
        split = (word.removeprefix(self.prefix) for word, _ in self.pre_tokenizer.pre_tokenize_str(text))
        return tuple(word for word in split if word)

    def joins_previous_word(self, text: str) -> bool:
        """Whether text right after a letter stays in that letter's word: its first character decides."""
        first = text[:1]
        if first not in self._joins:
            self._joins[first] = bool(self.words(first)) and len(self.words(_WORD_PROBE + first)) == 1
        return self._joins[first]

    def pieces(self, words: tuple[str, ...], *, marked: bool) -> list[int] | None:
        """Target ids for the words. The word the context decides (CLIP: the last, T5: the first) carries the
        marker only when `marked`; the others always do. None if any piece is unknown."""
        key = (words, marked)
        if key not in self._pieces:
            context_word = len(words) - 1 if self.marks_word_end else 0
            ids = [
                piece
                for position, word in enumerate(words)
                for piece in self._word_pieces(word, marked=marked or position != context_word)
            ]
            self._pieces[key] = None if not ids or self.unk_id in ids else ids
        return self._pieces[key]

    def _word_pieces(self, word: str, *, marked: bool) -> list[int]:
        exact = self.vocab.get(self.prefix + word + self.suffix if marked else word)
        if exact is not None:
            return [exact]
        # CLIP's BPE adds "</w>" itself (its marked model has the suffix); Unigram segments "▁" with the word.
        return [token.id for token in self._models[marked].tokenize(self.prefix + word if marked else word)]


def added_beyond_model(tokenizer: PreTrainedTokenizerBase) -> tuple[set[int], dict[int, str]]:
    """Tokens added on top of the subword model, matched whole before it runs: (special ids, text of others).

    Added tokens the model's own vocabulary also holds are ordinary pieces for the readers below (some
    conversions register SentencePiece's <0xNN> bytes as special added tokens; they are still bytes).
    """
    model_ids = set(backend_of(tokenizer, "captioner").get_vocab(with_added_tokens=False).values())
    added = {
        token_id: token
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token_id not in model_ids
    }
    special = {token_id for token_id, token in added.items() if token.special}
    return special, {token_id: token.content for token_id, token in added.items() if not token.special}


def _components(backend: Tokenizer) -> str:
    """The normaliser, pre-tokenizer and decoder as text (each repr names its types and marker characters):
    where a tokenizer declares its word markers."""
    return " ".join(str(part) for part in (backend.normalizer, backend.pre_tokenizer, backend.decoder))


def source_reader(tokenizer: PreTrainedTokenizerBase, target: TargetPieces) -> Callable[[str], Reading]:
    """How to read one source token string, by the source tokenizer's subword convention."""
    backend = backend_of(tokenizer, "captioner")
    model = backend.model
    if isinstance(model, WordPiece):
        return _wordpiece_reader(model.continuing_subword_prefix, backend, target)
    if isinstance(model, BPE) and model.end_of_word_suffix:
        if not target.marks_word_end:
            raise ValueError(
                f"captioner tokenizer {type(tokenizer).__name__} marks word ENDS "
                f"('{model.end_of_word_suffix}') and the generator tokenizer word STARTS "
                f"('{target.prefix}'): where a word starts depends on the token before, which the bridge "
                "does not read"
            )
        return _end_marker_reader(model.end_of_word_suffix)
    components = _components(backend)
    if isinstance(model, BPE) and "ByteLevel(" in components:
        return _start_marker_reader(_byte_level_text, target)
    byte_fallback = getattr(model, "byte_fallback", False)  # Unigram does not expose it
    if isinstance(model, BPE | Unigram) and (_SENTENCEPIECE_SPACE in components or byte_fallback):
        return _start_marker_reader(_sentencepiece_text, target)
    raise ValueError(
        f"captioner tokenizer {type(tokenizer).__name__} uses {type(model).__name__} with no word marker the "
        "bridge reads: WordPiece ('##'), byte-level BPE ('Ġ'), SentencePiece ('▁') or CLIP BPE ('</w>')"
    )


def _wordpiece_reader(prefix: str, backend: Tokenizer, target: TargetPieces) -> Callable[[str], Reading]:
    source_pre_tokenizer = backend.pre_tokenizer

    def read_wordpiece(token: str) -> Reading:
        continues = token.startswith(prefix) and len(token) > len(prefix)
        text = token[len(prefix) :] if continues else token
        # BERT's "[unused17]" pre-tokenizes into "[", "unused17", "]": no text yields it, so it maps to unk.
        splits = source_pre_tokenizer is not None and len(source_pre_tokenizer.pre_tokenize_str(text)) != 1
        return Reading(() if splits else target.words(text), "by_context", continues)

    return read_wordpiece


def _end_marker_reader(suffix: str) -> Callable[[str], Reading]:
    def read_end_marked(token: str) -> Reading:
        # Already in the byte alphabet a CLIP-style target shares: match the string as it is.
        ends = token.endswith(suffix) and len(token) > len(suffix)
        text = token[: -len(suffix)] if ends else token
        return Reading((text,), "final" if ends else "inner", False)

    return read_end_marked


def _start_marker_reader(
    to_text: Callable[[str], str | None], target: TargetPieces
) -> Callable[[str], Reading]:
    """Pieces whose text starts with a space start a word; the others continue the word before them."""

    def read_start_marked(token: str) -> Reading:
        text = to_text(token)
        if text is None:
            return Reading((), "by_context", False)
        words = target.words(text)
        starts = text[:1].isspace()
        return Reading(words, "by_context", not starts and target.joins_previous_word(text))

    return read_start_marked


# GPT-2's byte alphabet: one printable character per byte value. translate() turns each into the latin-1
# character of its byte, so that encode("latin-1") gives the bytes.
_BYTE_SYMBOLS = frozenset(bytes_to_unicode().values())
_BYTE_TABLE = {ord(symbol): byte for byte, symbol in bytes_to_unicode().items()}


def _byte_level_text(token: str) -> str | None:
    """GPT-2 byte-alphabet piece -> its UTF-8 text ("Ġ" is the space); None if it is not whole UTF-8."""
    if not _BYTE_SYMBOLS.issuperset(token):
        return None
    try:
        return token.translate(_BYTE_TABLE).encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return None


def _sentencepiece_text(token: str) -> str | None:
    """SentencePiece piece -> text ("▁" is the space); a <0xNN> byte is text only as printable ASCII."""
    byte = _BYTE_FALLBACK.fullmatch(token)
    if byte is None:
        return token.replace(_SENTENCEPIECE_SPACE, " ")
    value = int(byte.group(1), 16)
    return chr(value) if 0x20 <= value < 0x7F else None
