"""The words and tokenizers of the tiny random-init models (models/tiny.py, models/captioners/): one word list,
written as each model family's own kind of tokenizer, so every code path that reads token strings or ids
meets the subword markers of the real checkpoints.

The kinds: BERT WordPiece (`##` continues a word: BLIP, GIT), byte-level BPE (`Ġ` starts a word: OPT,
SmolVLM), SentencePiece-style BPE with byte fallback (`▁` starts a word: Llama, IDEFICS); CLIP's BPE (`</w>`
ends a word) is written by models/tiny.py for the generator.
T5's SentencePiece unigram model (`▁` starts a word, no byte fallback), which SD3 and Flux read prompts
with, is trained by `sentencepiece_unigram`.
"""

from __future__ import annotations

import io
import json
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import sentencepiece
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


# Every character plain ASCII text may hold: required in the unigram vocabulary, as T5's real one covers them
# all, so a caption with a word outside the list splits into characters instead of meeting <unk>.
_ASCII_TEXT = string.ascii_letters + string.digits + string.punctuation


def sentencepiece_unigram(words: Sequence[str], folder: Path, *, file_name: str = "spiece.model") -> Path:
    """A T5-style SentencePiece unigram model trained on the word list, written to folder/file_name; returns
    its path.

    T5's layout: <pad> 0, </s> 1, <unk> 2, no <s>. SentencePiece seeds its pieces from substrings met in more
    than one distinct sentence, so each word is given alone and beside its neighbour: then every word of a
    realistic list becomes one `▁word` piece. Trained on one thread, the model is the same bytes for the same
    words.
    """
    words = list(words)
    corpus = [
        *words,
        *(f"{word} {neighbour}" for word, neighbour in zip(words, [*words[1:], *words[:1]], strict=True)),
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        # A soft limit with room for every word, character and special; the trainer keeps what the corpus has.
        vocab_size=2 * len(words) + len(_ASCII_TEXT) + 3,
        hard_vocab_limit=False,
        character_coverage=1.0,
        required_chars=_ASCII_TEXT,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_bytes(model.getvalue())
    return path


_CLIP_BOS, _CLIP_EOS, _CLIP_WORD_END = "<|startoftext|>", "<|endoftext|>", "</w>"
# CLIP's pre-tokenizer splits text into letter runs, single digits and punctuation runs before BPE.
_CLIP_PRETOKEN = re.compile(r"[^\W\d_]+|\d|[^\s\w]+")


def _learn_bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that turn every training word into one token, learnt greedily by pair frequency like BPE.

    Learning merges (rather than listing each word's prefixes) keeps the ranks consistent, so the BPE
    tokenizer, which applies merges by rank, reproduces every training word as a single token.
    """
    symbols = [[*word[:-1], word[-1] + _CLIP_WORD_END] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(pair for word in symbols for pair in pairwise(word))
        if not pair_counts:
            return merges
        # Most frequent first; ties broken by the pair itself so the vocabulary is deterministic.
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        symbols = [_apply_merge(word, best) for word in symbols]


def _apply_merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def write_clip_bpe(words: Sequence[str], folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json + merges.txt in CLIP's layout: 256 byte symbols, the same with </w>, merges, specials.

    The full byte alphabet means any text, including unknown words, tokenizes into byte-level pieces.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    byte_encoder = bytes_to_unicode()
    pretokens = {
        "".join(byte_encoder[b] for b in piece.encode("utf-8"))
        for word in words
        for piece in _CLIP_PRETOKEN.findall(word)
    }
    merges = _learn_bpe_merges(sorted(pretokens))
    tokens = [*byte_symbols, *(s + _CLIP_WORD_END for s in byte_symbols), *(a + b for a, b in merges)]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return vocab, merges
