"""The words and tokenizers of the tiny random-init models (models/tiny.py, models/captioners/): one word list,
written as each model family's own kind of tokenizer, so every code path that reads token strings or ids
meets the subword markers of the real checkpoints.

The kinds: BERT WordPiece (`##` continues a word: BLIP, GIT), byte-level BPE (`Ġ` starts a word: OPT,
SmolVLM), SentencePiece-style BPE with byte fallback (`▁` starts a word: Llama, IDEFICS); CLIP's BPE (`</w>`
ends a word) is written by models/tiny.py for the generator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

SHAPES_WORDS: tuple[str, ...] = (
    "circle", "square", "triangle", "shape", "shapes",
    "red", "green", "blue", "yellow", "purple", "orange",
    "small", "large", "big", "little", "tiny", "huge",
    "top", "bottom", "left", "right", "center", "centre", "middle", "corner", "side", "upper", "lower",
    "background", "white", "black", "gray", "grey", "colored", "coloured",
    # The rest of the shapes grammar's words (data/shapes.py WORDS), which tests/models/test_tiny.py checks
    # this tuple covers: listed here so that models/ does not import data/.
    "a", "an", "and", "at", "image", "in", "is", "of", "picture", "the", "there",
)  # fmt: skip

COMMON_CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "is", "are", "there", "here", "this", "that",
    "it", "its", "to", "for", "from", "by", "near", "next", "behind", "front", "over", "under", "above",
    "below", "beside", "between", "inside", "outside", "into", "through", "around", "while", "as", "up",
    "down", "out", "some", "two", "three", "one", "four", "several", "many", "other", "each", "his", "her",
    "their", "has", "have", "who", "which", "very", "all", "no", "not", "be", "being", "close",
    "picture", "image", "photo", "photograph", "view", "shot", "drawing", "painting", "scene",
    "man", "woman", "men", "women", "person", "people", "boy", "girl", "child", "children", "kid", "baby",
    "player", "group", "couple", "dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "bear",
    "zebra", "giraffe", "animal", "sitting", "standing", "walking", "running", "riding", "holding",
    "playing", "eating", "looking", "lying", "laying", "flying", "wearing", "carrying", "talking",
    "watching", "waiting", "parked", "covered", "filled", "made", "street", "road", "city", "building",
    "house", "room", "kitchen", "bathroom", "bedroom", "table", "chair", "bench", "couch", "bed", "desk",
    "window", "door", "wall", "floor", "sign", "car", "bus", "truck", "train", "bike", "bicycle",
    "motorcycle", "boat", "plane", "airplane", "water", "beach", "ocean", "sea", "lake", "river", "snow",
    "grass", "field", "tree", "trees", "park", "sky", "mountain", "hill", "food", "pizza", "plate", "bowl",
    "cake", "sandwich", "fruit", "banana", "apple", "cup", "glass", "bottle", "ball", "frisbee",
    "umbrella", "kite", "phone", "computer", "laptop", "keyboard", "book", "clock", "light", "toilet",
    "sink", "shirt", "hat", "tennis", "baseball", "skateboard", "surfboard", "board", "game", "bat",
    "racket", "wave", "day", "night", "old", "young", "new", "open", "empty", "full", "tall", "long",
    "short", "wooden", "dark", "bright", "pink", "brown", "silver",
)  # fmt: skip

# A few WordPiece continuations, so that plural and verb forms of vocabulary words tokenize as pieces.

_WORDPIECE_SUFFIXES = ("##s", "##es", "##ing", "##ed", "##er", "##ly", "##y")
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCTUATION = tuple(".,;:!?'\"()-/&")
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")
# The real BLIP tokenizer (Salesforce/blip-image-captioning-*) adds "[DEC]" as bos; generation starts from it.


def default_vocabulary() -> tuple[str, ...]:
    """Shapes-world words (the shapes grammar's included) and common caption words."""
    return tuple(dict.fromkeys((*SHAPES_WORDS, *COMMON_CAPTION_WORDS)))


def clean_words(vocab_words: Sequence[str] | None) -> list[str]:
    """Lower-cased, de-duplicated words; a clear error for entries that cannot be vocabulary words."""
    words = default_vocabulary() if vocab_words is None else vocab_words
    cleaned: list[str] = []
    for position, word in enumerate(words):
        if not isinstance(word, str) or not word.strip() or any(ch.isspace() for ch in word.strip()):
            raise ValueError(f"vocab_words[{position}] = {word!r}: each entry must be one non-empty word")
        cleaned.append(word.strip().lower())
    return list(dict.fromkeys(cleaned))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for weight init without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_vocab_size(vocab_size: int, tokens: int, model: str) -> None:
    """An embedding smaller than the tokenizer would index past its end on the first rare token."""
    if vocab_size < tokens:
        raise ValueError(
            f"{model} text_options vocab_size={vocab_size} is below the tokenizer's {tokens} tokens"
        )


def write_bert_vocab(words: Sequence[str], folder: Path) -> dict[str, int]:
    """vocab.txt in BERT's layout: specials first, then whole words, characters and ## continuations.

    Single letters and their ## forms let any lower-case ASCII word split into pieces instead of [UNK].
    """
    pieces = [*_BERT_SPECIALS, *_PUNCTUATION, *words, *_LETTERS, *(f"##{ch}" for ch in _LETTERS)]
    pieces = list(dict.fromkeys([*pieces, *_WORDPIECE_SUFFIXES]))
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return {piece: index for index, piece in enumerate(pieces)}


def _caption_corpus(words: Sequence[str]) -> list[str]:
    """Each word alone and after a space, so a BPE trainer learns both its word-start and word-inner forms."""
    return [*words, *(f" {word}" for word in words), " ".join(words)]


def _train_bpe(
    tokenizer: Tokenizer, words: Sequence[str], special_tokens: Sequence[str], **options
) -> Tokenizer:
    """Merge until no pair is left: every word of the list becomes one token in each of its forms."""
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=1,
        special_tokens=list(special_tokens),
        show_progress=False,
        **options,
    )
    tokenizer.train_from_iterator(_caption_corpus(words), trainer)
    return tokenizer


def byte_level_bpe(words: Sequence[str], special_tokens: Sequence[str]) -> Tokenizer:
    """GPT-2-style byte-level BPE (OPT, SmolVLM): `Ġ` marks a word that follows a space; any text encodes."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _train_bpe(tokenizer, words, special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def sentencepiece_bpe(words: Sequence[str], special_tokens: Sequence[str]) -> Tokenizer:
    """Llama-style SentencePiece BPE: `▁` marks a word start, unknown characters fall back to <0xNN> bytes."""
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    tokenizer = Tokenizer(BPE(byte_fallback=True, unk_token=special_tokens[0], fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trained = json.loads(_train_bpe(tokenizer, words, [*special_tokens, *byte_tokens]).to_str())
    # Trained in as specials to get Llama's ids (right after the specials), but Llama keeps the byte pieces
    # as ordinary vocabulary: decode(skip_special_tokens=True) must not drop the characters they spell.
    trained["added_tokens"] = [
        token for token in trained["added_tokens"] if token["content"] not in byte_tokens
    ]
    return Tokenizer.from_str(json.dumps(trained))
