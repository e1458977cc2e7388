"""Vocabulary bridge: exact agreement with hard tokens, the mapping rules on hand-written vocabularies, coverage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from transformers import (
    BertTokenizer,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5TokenizerFast,
)

from cycletune.models.bridge import VocabularyBridge, describe_coverage, pair_coverage
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.tiny_vocabulary import (
    byte_level_bpe,
    default_vocabulary,
    sentencepiece_bpe,
    sentencepiece_unigram,
    write_bert_vocab,
)
from cycletune.models.token_pieces import TargetPieces

# Every word exists whole in both tiny vocabularies (models/tiny.py writes both from one word list).
CAPTIONS = ["a red circle on the left of a blue square", "a small green triangle"]

# Hand-written WordPiece vocabulary: whole words, "##" continuations, a word CLIP splits into pieces
# ("sunflower"), digits, a character outside the hand CLIP alphabet ("über"), and a BERT placeholder.
WORDPIECE_TOKENS = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]",
    "a", "dog", "run", "sun", "sunflower", "über", "##s", "##ning", "##flower", ".", "1990",
)  # fmt: skip
# Hand-written CLIP BPE merges, in rank order; the vocabulary is the alphabet plus every merge result.
CLIP_MERGES = (
    ("d", "o"), ("do", "g</w>"), ("do", "g"), ("r", "u"), ("ru", "n</w>"), ("ru", "n"), ("s", "u"),
    ("su", "n</w>"), ("su", "n"), ("n", "i"), ("ni", "n"), ("nin", "g</w>"), ("f", "l"), ("fl", "o"),
    ("flo", "w"), ("e", "r</w>"), ("flow", "er</w>"),
)  # fmt: skip
CLIP_ALPHABET = tuple("abcdefghijklmnopqrstuvwxyz0123456789.!")


@pytest.fixture(scope="module")
def tiny_bridge(frozen_captioner: Captioner, frozen_generator: Generator) -> VocabularyBridge:
    return VocabularyBridge.build(frozen_captioner.tokenizer, frozen_generator.tokenizer)


@pytest.fixture(scope="module")
def wordpiece() -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(WORDPIECE_TOKENS)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


@pytest.fixture(scope="module")
def clip() -> CLIPTokenizer:
    """CLIP layout with a pad distinct from eos ("!", as Stable Diffusion 2's tokenizer pads)."""
    symbols = [*CLIP_ALPHABET, *(symbol + "</w>" for symbol in CLIP_ALPHABET)]
    tokens = [*symbols, *(a + b for a, b in CLIP_MERGES), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(CLIP_MERGES), pad_token="!")


@pytest.fixture(scope="module")
def hand_bridge(wordpiece: BertTokenizer, clip: CLIPTokenizer) -> VocabularyBridge:
    return VocabularyBridge.build(wordpiece, clip, max_length=8)


@pytest.fixture(scope="module")
def hand_embedding(clip: CLIPTokenizer) -> torch.nn.Embedding:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Embedding(len(clip), 4).requires_grad_(False)


def _one_hot(ids: torch.Tensor, bridge: VocabularyBridge) -> torch.Tensor:
    return F.one_hot(ids, bridge.source_vocab_size).float()


def _soft(wordpiece: BertTokenizer, positions: list[dict[str, float]]) -> torch.Tensor:
    """[1, L, V] probabilities from {token: mass} per position."""
    probs = torch.zeros(1, len(positions), len(wordpiece))
    for position, masses in enumerate(positions):
        for token, mass in masses.items():
            probs[0, position, wordpiece.convert_tokens_to_ids(token)] = mass
    return probs


def _rows(embedding: torch.nn.Embedding, clip: CLIPTokenizer, *pieces: str) -> torch.Tensor:
    return embedding.weight[clip.convert_tokens_to_ids(list(pieces))]


def _recipe(bridge: VocabularyBridge, table: str, token_id: int, clip: CLIPTokenizer) -> list[str]:
    index, weight = getattr(bridge, f"{table}_index")[token_id], getattr(bridge, f"{table}_weight")[token_id]
    return clip.convert_ids_to_tokens(index[weight > 0].tolist())


def _encode_embeddings(generator: Generator, embeds: torch.Tensor) -> torch.Tensor:
    """The tiny SD generator's one CLIP encoder on token embeddings, pooling not read (no eos positions)."""
    return generator.encode_token_embeddings([embeds], [None])


def _reached_ids(bridge: VocabularyBridge) -> set[int]:
    """Target ids used by the recipes of tokens that do not map to unk."""
    mapped = bridge.unmapped == 0
    return {
        piece
        for table in ("final", "inner")
        for piece in getattr(bridge, f"{table}_index")[mapped][
            getattr(bridge, f"{table}_weight")[mapped] > 0
        ].tolist()
    }


def test_one_hot_caption_equals_hard_tokens_exactly(
    frozen_captioner: Captioner, frozen_generator: Generator, tiny_bridge: VocabularyBridge
) -> None:
    """Captioner tokens, one-hot, through the soft path == the generator's own tokenize + encode_text, bit for bit."""
    tokens = frozen_captioner.tokenize(
        CAPTIONS
    )  # [DEC] ... [SEP], the shorter caption padded with masked [PAD]
    assert not tokens["attention_mask"].all()
    token_embedding = frozen_generator.text_encoder.get_input_embeddings()
    embeds = tiny_bridge.embed(
        _one_hot(tokens["input_ids"], tiny_bridge), tokens["attention_mask"], token_embedding
    )
    hard_ids = frozen_generator.tokenize(CAPTIONS)
    assert torch.equal(embeds, token_embedding(hard_ids))
    assert torch.equal(_encode_embeddings(frozen_generator, embeds), frozen_generator.encode_text(hard_ids))
    assert (
        tiny_bridge.mass_coverage(_one_hot(tokens["input_ids"], tiny_bridge), tokens["attention_mask"]) == 1.0
    )


def test_truncation_keeps_eos_and_padding_fills_like_clip(
    frozen_captioner: Captioner, frozen_generator: Generator
) -> None:
    """max_length 6: the long caption is cut with eos last, the 6-token one fits exactly; 9 pads with pad."""
    tokens = frozen_captioner.tokenize(CAPTIONS)
    token_embedding = frozen_generator.text_encoder.get_input_embeddings()
    for max_length in (6, 9):
        bridge = VocabularyBridge.build(
            frozen_captioner.tokenizer, frozen_generator.tokenizer, max_length=max_length
        )
        hard_ids = frozen_generator.tokenizer(
            CAPTIONS, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
        ).input_ids
        assert hard_ids[0, -1] == frozen_generator.tokenizer.eos_token_id
        embeds = bridge.embed(
            _one_hot(tokens["input_ids"], bridge), tokens["attention_mask"], token_embedding
        )
        assert torch.equal(embeds, token_embedding(hard_ids))


def test_identity_for_one_tokenizer_on_both_sides(frozen_generator: Generator) -> None:
    """CLIP BPE -> the same CLIP BPE: every token maps to itself, "</w>" finality read from the token."""
    tokenizer = frozen_generator.tokenizer
    bridge = VocabularyBridge.build(tokenizer, tokenizer)
    every_token = torch.arange(len(tokenizer))
    for table in ("final", "inner"):
        assert getattr(bridge, f"{table}_index").shape == (len(tokenizer), 1)
        assert torch.equal(getattr(bridge, f"{table}_index")[:, 0], every_token)
        assert torch.equal(getattr(bridge, f"{table}_weight"), torch.ones(len(tokenizer), 1))
    assert bridge.coverage() == {
        "source_unk": 0.0,
        "source_exact": 1.0,
        "source_pieces": 0.0,
        "source_inner_exact": 1.0,
        "source_inner_pieces": 0.0,
        "target_reached": 1.0,
    }
    ids = frozen_generator.tokenize(CAPTIONS)
    token_embedding = frozen_generator.text_encoder.get_input_embeddings()
    embeds = bridge.embed(_one_hot(ids, bridge), torch.ones_like(ids), token_embedding)
    assert torch.equal(embeds, token_embedding(ids))


def test_word_finality_mixes_by_next_continuation_mass(
    wordpiece: BertTokenizer,
    clip: CLIPTokenizer,
    hand_bridge: VocabularyBridge,
    hand_embedding: torch.nn.Embedding,
) -> None:
    """'run' before 30% '##ning' is 0.7 'run</w>' + 0.3 'run'; masked mass after the end does not count."""
    probs = _soft(
        wordpiece,
        [{"[DEC]": 1.0}, {"run": 1.0}, {"##ning": 0.3, "dog": 0.7}, {"##s": 1.0}, {"dog": 1.0}, {"##s": 1.0}],
    )
    embeds = hand_bridge.embed(probs, torch.tensor([[1, 1, 1, 1, 1, 0]]), hand_embedding)[0]
    assert torch.equal(embeds[0], _rows(hand_embedding, clip, "<|startoftext|>")[0])
    run_final, run_inner = _rows(hand_embedding, clip, "run</w>", "run")
    torch.testing.assert_close(embeds[1], 0.7 * run_final + 0.3 * run_inner)
    # Position 2 is followed by a sure "##s": both of its candidates are read word-inner.
    ning_inner = _rows(hand_embedding, clip, "nin", "g").mean(dim=0)
    torch.testing.assert_close(embeds[2], 0.3 * ning_inner + 0.7 * _rows(hand_embedding, clip, "dog")[0])
    assert torch.equal(embeds[3], _rows(hand_embedding, clip, "s</w>")[0])  # "dog" follows: word-final
    assert torch.equal(embeds[4], _rows(hand_embedding, clip, "dog</w>")[0])  # the "##s" after is masked
    assert torch.equal(embeds[5:], _rows(hand_embedding, clip, "!").expand(3, -1))  # pad to max_length 8


def test_recipes_exact_pieces_specials_and_unk(
    wordpiece: BertTokenizer, clip: CLIPTokenizer, hand_bridge: VocabularyBridge
) -> None:
    def recipes(token: str) -> tuple[list[str], list[str]]:
        token_id = wordpiece.convert_tokens_to_ids(token)
        return _recipe(hand_bridge, "final", token_id, clip), _recipe(hand_bridge, "inner", token_id, clip)

    assert recipes("dog") == (["dog</w>"], ["dog"])
    assert recipes("##s") == (["s</w>"], ["s"])  # "##" stripped
    assert recipes("##flower") == (["flower</w>"], ["flow", "e", "r"])  # no inner "flower": CLIP's own BPE
    assert recipes("sunflower") == (["sun", "flower</w>"], ["sun", "flow", "e", "r"])
    assert recipes("1990") == (["1</w>", "9</w>", "9</w>", "0</w>"], ["1</w>", "9</w>", "9</w>", "0"])
    assert recipes("[DEC]") == recipes("[CLS]") == (["<|startoftext|>"], ["<|startoftext|>"])
    assert recipes("[SEP]") == (["<|endoftext|>"], ["<|endoftext|>"])
    assert recipes("[PAD]") == (["!"], ["!"])
    unk_tokens = ("[UNK]", "[MASK]", "[unused0]", "über")  # "ü" is outside the hand CLIP alphabet
    for token in unk_tokens:
        assert recipes(token) == ([clip.unk_token], [clip.unk_token])
    unmapped = {wordpiece.convert_ids_to_tokens(i) for i in hand_bridge.unmapped.nonzero().flatten().tolist()}
    assert unmapped == set(unk_tokens)
    # Multi-piece tokens weigh their pieces equally (the mean of their embeddings).
    sunflower = wordpiece.convert_tokens_to_ids("sunflower")
    assert hand_bridge.inner_weight[sunflower].tolist() == [0.25, 0.25, 0.25, 0.25]


def test_hand_pair_coverage(hand_bridge: VocabularyBridge, clip: CLIPTokenizer) -> None:
    """12 regular tokens ([unused0] is not a special token); 5 specials + [DEC] are mapped by role."""
    reached = {
        *("a</w>", "a", "dog</w>", "dog", "run</w>", "run", "sun</w>", "sun", "s</w>", "s", ".</w>", "."),
        *("flower</w>", "flow", "e", "r", "ning</w>", "nin", "g", "1</w>", "9</w>", "0</w>", "0"),
        *("<|startoftext|>", "<|endoftext|>", "!"),
    }
    assert set(clip.convert_ids_to_tokens(sorted(_reached_ids(hand_bridge)))) == reached
    assert hand_bridge.coverage() == pytest.approx(
        {
            "source_exact": 8 / 12,  # a dog run sun ##s ##ning ##flower .
            "source_pieces": 2 / 12,  # sunflower 1990
            "source_unk": 2 / 12,  # [unused0] über
            "source_inner_exact": 6 / 12,  # a dog run sun ##s .
            "source_inner_pieces": 4 / 12,  # sunflower ##ning ##flower 1990
            "target_reached": len(reached) / len(clip),
        }
    )


def test_the_logged_coverage_names_both_directions(hand_bridge: VocabularyBridge) -> None:
    assert describe_coverage(hand_bridge.coverage()).startswith(
        "captioner tokens -> generator: exact 66.7%, mean of pieces 16.7%, unk 16.7% (word-inner exact 50.0%); "
        "generator tokens reached "
    )


def test_tiny_pair_coverage(
    frozen_captioner: Captioner, frozen_generator: Generator, tiny_bridge: VocabularyBridge
) -> None:
    """models/tiny.py writes both vocabularies from one word list, so whole words match exactly.

    The WordPiece side adds single characters and "##" forms (CLIP's byte symbols, exact both ways) and the
    suffixes ##es ##ing ##ed ##er ##ly: CLIP's BPE learnt "ly</w>" from no word, so "##ly" alone splits.
    Word-inner recipes are exact only where CLIP has the bare string: single characters, punctuation, and
    the few words or suffixes that are also intermediate BPE merges.
    """
    source, target = frozen_captioner.tokenizer, frozen_generator.tokenizer
    specials = set(source.all_special_ids)
    regular = [
        token
        for index, token in enumerate(source.convert_ids_to_tokens(list(range(len(source)))))
        if index not in specials
    ]
    target_vocab = target.get_vocab()
    bare = [token.removeprefix("##") for token in regular]
    coverage = tiny_bridge.coverage()
    assert coverage["source_unk"] == 0.0  # the byte alphabet spells anything; the tiny BERT has no [unusedN]
    split = [token for token, text in zip(regular, bare, strict=True) if text + "</w>" not in target_vocab]
    assert split == ["##ly"]
    assert coverage["source_exact"] == (len(regular) - 1) / len(regular)
    assert coverage["source_pieces"] == 1 / len(regular)
    inner_exact = sum(text in target_vocab for text in bare)
    assert inner_exact >= 2 * 36 + 13  # letters/digits, their ## forms and the punctuation, at least
    assert coverage["source_inner_exact"] == inner_exact / len(regular)
    assert coverage["target_reached"] == len(_reached_ids(tiny_bridge)) / len(target)


def test_mass_coverage_counts_unk_mass_at_valid_positions(
    wordpiece: BertTokenizer, hand_bridge: VocabularyBridge
) -> None:
    """The start slot's mass counts as mapped even on an unk token: it becomes bos whatever it holds."""
    probs = _soft(
        wordpiece,
        [
            {"[MASK]": 1.0},
            {"dog": 0.5, "[UNK]": 0.5},
            {"über": 0.25, "##s": 0.75},
            {"[SEP]": 1.0},
            {"[MASK]": 1.0},
        ],
    )
    assert hand_bridge.mass_coverage(probs, torch.tensor([[1, 1, 1, 1, 0]])) == pytest.approx(1 - 0.75 / 4)


def test_gradient_reaches_probs_through_the_frozen_encoder(
    frozen_captioner: Captioner, frozen_generator: Generator, tiny_bridge: VocabularyBridge
) -> None:
    tokens = frozen_captioner.tokenize(CAPTIONS)
    logits = torch.randn(*tokens["input_ids"].shape, tiny_bridge.source_vocab_size, requires_grad=True)
    embeds = tiny_bridge.embed(
        logits.softmax(dim=-1), tokens["attention_mask"], frozen_generator.text_encoder.get_input_embeddings()
    )
    _encode_embeddings(frozen_generator, embeds).square().sum().backward()
    gradient_norms = logits.grad.norm(dim=-1)
    caption = tokens["attention_mask"].bool()
    caption[:, 0] = False  # the start slot always reads bos
    assert (gradient_norms[caption] > 0).all()
    assert (gradient_norms[~caption] == 0).all()  # masked positions read pad
    assert all(parameter.grad is None for parameter in frozen_generator.text_encoder.parameters())


def test_embed_gradcheck_including_the_finality_mix(
    wordpiece: BertTokenizer, hand_bridge: VocabularyBridge, hand_embedding: torch.nn.Embedding
) -> None:
    """float64 finite differences, with "##" mass at every position so q_{i+1} carries gradient too."""
    embedding = torch.nn.Embedding.from_pretrained(hand_embedding.weight.double())
    logits = torch.randn(
        1, 4, len(wordpiece), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones(1, 4)
    assert torch.autograd.gradcheck(
        lambda logits: hand_bridge.embed(logits.softmax(dim=-1), mask, embedding), logits.requires_grad_()
    )


def test_bad_inputs_are_named(
    wordpiece: BertTokenizer,
    clip: CLIPTokenizer,
    hand_bridge: VocabularyBridge,
    hand_embedding: torch.nn.Embedding,
) -> None:
    probs = _soft(wordpiece, [{"[DEC]": 1.0}, {"dog": 1.0}])
    with pytest.raises(ValueError, match="captioner vocabulary"):
        hand_bridge.embed(probs[..., :-1], torch.ones(1, 2), hand_embedding)
    with pytest.raises(ValueError, match="right-padded"):
        hand_bridge.embed(probs, torch.tensor([[0, 1]]), hand_embedding)
    with pytest.raises(ValueError, match="generator tokenizer BertTokenizer must be a BPE"):
        VocabularyBridge.build(wordpiece, wordpiece)
    with pytest.raises(ValueError, match="outside the captioner vocabulary"):
        VocabularyBridge.build(wordpiece, clip, end_token_id=len(wordpiece))


def test_a_captioner_embedding_padded_beyond_its_tokenizer_gets_unmapped_extra_ids(
    wordpiece: BertTokenizer,
    clip: CLIPTokenizer,
    hand_bridge: VocabularyBridge,
    hand_embedding: torch.nn.Embedding,
) -> None:
    """Models often round their vocabulary up (BLIP-2 OPT: 50272 logits, 50265 tokens): the bridge takes the
    logit count, maps the extra ids to unk, and leaves every real token's recipe unchanged."""
    padded = VocabularyBridge.build(wordpiece, clip, max_length=8, source_vocab_size=len(wordpiece) + 3)
    assert padded.source_vocab_size == len(wordpiece) + 3
    assert padded.unmapped[-3:].tolist() == [1.0, 1.0, 1.0]
    probs = _soft(wordpiece, [{"[DEC]": 1.0}, {"dog": 1.0}])
    extended = F.pad(probs, (0, 3))
    assert torch.equal(
        padded.embed(extended, torch.ones(1, 2), hand_embedding),
        hand_bridge.embed(probs, torch.ones(1, 2), hand_embedding),
    )
    with pytest.raises(ValueError, match="smaller than the captioner tokenizer"):
        VocabularyBridge.build(wordpiece, clip, source_vocab_size=len(wordpiece) - 1)


# ------------------------------------------------------------------------------ every source tokenizer kind

KINDS = ("wordpiece", "byte_level", "sentencepiece", "clip")
BPE_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
HAND_WORDS = ("a", "dog", "sun", "flower", "run")


def _source_tokenizer(
    kind: str, words: Sequence[str], folder: Path, clip: CLIPTokenizer
) -> PreTrainedTokenizerBase:
    """The kind's tokenizer over `words`, built as the tiny captioners build theirs; "clip" is the target."""
    if kind == "wordpiece":
        return BertTokenizer(vocab=write_bert_vocab(words, folder))
    if kind == "clip":
        return clip
    build = byte_level_bpe if kind == "byte_level" else sentencepiece_bpe
    return PreTrainedTokenizerFast(tokenizer_object=build(words, list(BPE_SPECIALS.values())), **BPE_SPECIALS)


def _caption_rows(
    tokenizer: PreTrainedTokenizerBase, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captioner.tokenize's caption part: a start slot (the ":" of a chat turn "Assistant:"), the caption's
    tokens, the end token (eos, BERT's [SEP]), then pad."""
    start = tokenizer("Assistant:", add_special_tokens=False)["input_ids"][-1]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bodies = tokenizer(captions, add_special_tokens=False)["input_ids"]
    ids = torch.full((len(bodies), max(map(len, bodies)) + 2), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, body in enumerate(bodies):
        ids[row, : len(body) + 2] = torch.tensor([start, *body, end])
        mask[row, : len(body) + 2] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny_sources(
    frozen_generator: Generator, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[PreTrainedTokenizerBase, VocabularyBridge]]:
    """Each kind's tokenizer over the tiny generator's own word list, and its bridge to that generator."""
    folder, target = tmp_path_factory.mktemp("wordpiece"), frozen_generator.tokenizer
    sources = {kind: _source_tokenizer(kind, default_vocabulary(), folder, target) for kind in KINDS}
    return {kind: (source, VocabularyBridge.build(source, target)) for kind, source in sources.items()}


@pytest.fixture(scope="module")
def hand_sources(
    clip: CLIPTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[PreTrainedTokenizerBase, VocabularyBridge]]:
    """Each kind's tokenizer over a few words, and its bridge to the hand-written CLIP vocabulary."""
    folder = tmp_path_factory.mktemp("hand_wordpiece")
    sources = {kind: _source_tokenizer(kind, HAND_WORDS, folder, clip) for kind in KINDS}
    return {
        kind: (source, VocabularyBridge.build(source, clip, max_length=8)) for kind, source in sources.items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_one_hot_equals_the_generator_on_its_own_tokens(
    kind: str, tiny_sources: dict, frozen_generator: Generator
) -> None:
    """Words in both vocabularies, one-hot through the bridge == the generator's tokenize + encode, bit for bit."""
    source, bridge = tiny_sources[kind]
    ids, mask = _caption_rows(source, CAPTIONS)
    assert not mask.all()  # the shorter caption is padded
    token_embedding = frozen_generator.text_encoder.get_input_embeddings()
    embeds = bridge.embed(_one_hot(ids, bridge), mask, token_embedding)
    hard_ids = frozen_generator.tokenize(CAPTIONS)
    assert torch.equal(embeds, token_embedding(hard_ids))
    assert torch.equal(_encode_embeddings(frozen_generator, embeds), frozen_generator.encode_text(hard_ids))


# "dogs" is two pieces in every kind ("dog" continues, CLIP's "dog" "s</w>"); "." follows a word without a
# space or a start marker, but CLIP splits it off as ".</w>", so "run" stays word-final.
MULTI_PIECE_CAPTION = "a dogs run."
MULTI_PIECE_TOKENS = {
    "wordpiece": ["a", "dog", "##s", "run", "."],
    "byte_level": ["a", "Ġdog", "s", "Ġrun", "."],
    "sentencepiece": ["▁a", "▁dog", "s", "▁run", "<0x2E>"],  # "." is not in its alphabet: a byte fallback
    "clip": ["a</w>", "dog", "s</w>", "run</w>", ".</w>"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_multi_piece_words_and_punctuation_follow_each_kinds_word_marker(
    kind: str, hand_sources: dict, clip: CLIPTokenizer, hand_embedding: torch.nn.Embedding
) -> None:
    source, bridge = hand_sources[kind]
    ids, mask = _caption_rows(source, [MULTI_PIECE_CAPTION])
    assert source.convert_ids_to_tokens(ids[0, 1:-1].tolist()) == MULTI_PIECE_TOKENS[kind]
    embeds = bridge.embed(_one_hot(ids, bridge), mask, hand_embedding)
    hard_ids = clip([MULTI_PIECE_CAPTION], padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert clip.convert_ids_to_tokens(hard_ids[0, 1:6].tolist()) == MULTI_PIECE_TOKENS["clip"]
    assert torch.equal(embeds, hand_embedding(hard_ids))
    # Byte-level BPE writes a text's first word without "Ġ": it "continues" the start slot, which is bos anyway.
    expected_continues = {"byte_level": [1, 0, 1, 0, 0], "clip": [0, 0, 0, 0, 0]}.get(kind, [0, 0, 1, 0, 0])
    assert bridge.continuation[ids[0, 1:-1]].tolist() == expected_continues


def _unmapped_tokens(
    source: PreTrainedTokenizerBase, bridge: VocabularyBridge, tokens: list[str]
) -> list[bool]:
    return [bool(bridge.unmapped[source.convert_tokens_to_ids(token)]) for token in tokens]


def test_partial_utf8_and_non_ascii_byte_fallbacks_are_unmappable(
    frozen_generator: Generator, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """ "über" is "Ã" "¼" (0xC3 0xBC) in byte-level pieces and <0xC3> <0xBC> in byte fallbacks: half a
    character each. Whole characters map, also outside ASCII: "ĠÃ¼ber" is one learnt byte-level piece."""
    target = frozen_generator.tokenizer
    folder = tmp_path_factory.mktemp("utf8")
    byte_level = _source_tokenizer("byte_level", [*HAND_WORDS, "über"], folder, target)
    sentencepiece = _source_tokenizer("sentencepiece", HAND_WORDS, folder, target)
    byte_bridge = VocabularyBridge.build(byte_level, target)
    assert _unmapped_tokens(byte_level, byte_bridge, ["Ã", "¼", "Ġ", "ĠÃ¼ber", "Ġdog", "."]) == [
        *(True, True, True),
        *(False, False, False),
    ]
    uber = byte_level.convert_tokens_to_ids("ĠÃ¼ber")
    assert target.decode(byte_bridge.final_index[uber][byte_bridge.final_weight[uber] > 0]) == "über"
    sentencepiece_bridge = VocabularyBridge.build(sentencepiece, target)
    byte_pieces = ["<0xC3>", "<0xBC>", "<0x0A>", "<0x20>", "<0x2E>", "<0x41>", "▁"]
    assert _unmapped_tokens(sentencepiece, sentencepiece_bridge, byte_pieces) == [
        *(True, True, True, True),  # half characters, a newline, a space: no text CLIP keeps
        *(False, False),  # "." and "A" (lower-cased by CLIP's normaliser)
        True,  # "▁" alone is a space
    ]
    for piece, text in (("<0x2E>", ".</w>"), ("<0x41>", "a</w>")):
        token_id = sentencepiece.convert_tokens_to_ids(piece)
        assert target.convert_ids_to_tokens(sentencepiece_bridge.final_index[token_id, :1].tolist()) == [text]


@pytest.mark.parametrize("kind", KINDS)
def test_position_zero_is_bos_whatever_the_start_slot_holds(
    kind: str, tiny_sources: dict, frozen_generator: Generator
) -> None:
    """An ordinary token (":" of "Assistant:"), a special, an unmapped id or a soft mix: always bos, no gradient."""
    source, bridge = tiny_sources[kind]
    token_embedding = frozen_generator.text_encoder.get_input_embeddings()
    bos = token_embedding.weight[frozen_generator.tokenizer.bos_token_id]
    ids, mask = _caption_rows(source, CAPTIONS[:1])
    probs = _one_hot(ids, bridge).repeat(4, 1, 1)
    probs[1, 0] = _one_hot(torch.tensor(source.pad_token_id), bridge)
    probs[2, 0] = _one_hot(torch.tensor(source.convert_tokens_to_ids(source.unk_token)), bridge)
    probs[3, 0] = torch.rand(bridge.source_vocab_size, generator=torch.Generator().manual_seed(0)).softmax(0)
    probs.requires_grad_()
    embeds = bridge.embed(probs, mask.repeat(4, 1), token_embedding)
    assert all(torch.equal(row, bos) for row in embeds[:, 0])
    assert torch.equal(embeds[1:, 1:], embeds[:1, 1:].expand(3, -1, -1))
    embeds.square().sum().backward()
    assert (probs.grad[:, 0] == 0).all() and (probs.grad[:, 1:].abs().sum(-1) > 0).all()


def test_end_token_specials_and_added_tokens(clip: CLIPTokenizer) -> None:
    """A caption-end token maps to eos; an eos that is also bos (OPT's "</s>") is eos; added special tokens
    (image placeholders, declared or only flagged special) map to unk; other added tokens are read by their
    text, as a word of their own."""
    source = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(HAND_WORDS, ["</s>", "<pad>"]),
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<end_of_utterance>"],
    )
    source.add_tokens(["sunflower", AddedToken("<row_1_col_1>", special=True)])
    bridge = VocabularyBridge.build(
        source, clip, end_token_id=source.convert_tokens_to_ids("<end_of_utterance>")
    )

    def final_recipe(token: str) -> list[str]:
        return _recipe(bridge, "final", source.convert_tokens_to_ids(token), clip)

    assert final_recipe("</s>") == final_recipe("<end_of_utterance>") == ["<|endoftext|>"]
    assert not bridge.unmapped[source.convert_tokens_to_ids("<end_of_utterance>")]  # eos by role, not unk
    assert final_recipe("<pad>") == ["!"]
    for placeholder in ("<image>", "<row_1_col_1>"):
        assert final_recipe(placeholder) == [clip.unk_token]
        assert bridge.unmapped[source.convert_tokens_to_ids(placeholder)]
    assert final_recipe("sunflower") == ["sun", "flower</w>"]
    assert _recipe(bridge, "inner", source.convert_tokens_to_ids("sunflower"), clip) == [
        "sun",
        "flow",
        "e",
        "r",
    ]


def test_pair_coverage_is_the_bridges_coverage(
    frozen_captioner: Captioner, frozen_generator: Generator, tiny_bridge: VocabularyBridge
) -> None:
    assert pair_coverage(frozen_captioner.tokenizer, frozen_generator.tokenizer) == tiny_bridge.coverage()


# ------------------------------------------------------------------------- a T5 (SentencePiece Unigram) target

# The captioner kinds, and T5's own Unigram as a source too (read like any "▁" SentencePiece).
T5_SOURCE_KINDS = ("wordpiece", "byte_level", "sentencepiece", "t5")


def _t5_tokenizer(words: Sequence[str], folder: Path) -> T5TokenizerFast:
    """T5's layout (<pad> 0, </s> 1, <unk> 2, no bos, 100 <extra_id_N> specials) over a word list."""
    sentencepiece_unigram(words, folder)
    return T5TokenizerFast.from_pretrained(str(folder), model_max_length=32)


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> T5TokenizerFast:
    return _t5_tokenizer(default_vocabulary(), tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def t5_embedding(t5: T5TokenizerFast) -> torch.nn.Embedding:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Embedding(len(t5), 4).requires_grad_(False)


@pytest.fixture(scope="module")
def t5_sources(
    t5: T5TokenizerFast, clip: CLIPTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[PreTrainedTokenizerBase, VocabularyBridge]]:
    """Each kind's tokenizer over the tiny word list, and its bridge to the T5 tokenizer (max_length 16)."""
    folder = tmp_path_factory.mktemp("t5_wordpiece")
    sources = {
        kind: t5 if kind == "t5" else _source_tokenizer(kind, default_vocabulary(), folder, clip)
        for kind in T5_SOURCE_KINDS
    }
    return {
        kind: (source, VocabularyBridge.build(source, t5, max_length=16)) for kind, source in sources.items()
    }


def _t5_ids(t5: T5TokenizerFast, captions: list[str], max_length: int) -> torch.Tensor:
    return t5(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("kind", T5_SOURCE_KINDS)
def test_every_kind_into_t5_one_hot_equals_t5s_own_tokens_cut_or_padded(
    kind: str, t5_sources: dict, t5: T5TokenizerFast, t5_embedding: torch.nn.Embedding
) -> None:
    """No bos: caption pieces, "</s>", <pad>. max_length 6 cuts the long caption ("</s>" kept last), 11 fits
    it exactly, 16 pads both; the start slot (":" of "Assistant:") is dropped, not read."""
    source, _ = t5_sources[kind]
    ids, mask = _caption_rows(source, CAPTIONS)
    assert not mask.all()
    for max_length in (6, 11, 16):
        bridge = VocabularyBridge.build(source, t5, max_length=max_length)
        embeds = bridge.embed(_one_hot(ids, bridge), mask, t5_embedding)
        assert torch.equal(embeds, t5_embedding(_t5_ids(t5, CAPTIONS, max_length)))
        assert bridge.mass_coverage(_one_hot(ids, bridge), mask) == 1.0
    # What was compared: whole-word pieces, eos last on a cut, pad past the caption.
    cut = ["▁a", "▁red", "▁circle", "▁on", "▁the", "</s>"]
    assert t5.convert_ids_to_tokens(_t5_ids(t5, CAPTIONS, 6)[0]) == cut
    padded = ["▁a", "▁small", "▁green", "▁triangle", "</s>", *["<pad>"] * 11]
    assert t5.convert_ids_to_tokens(_t5_ids(t5, CAPTIONS, 16)[1]) == padded


@pytest.mark.parametrize("kind", T5_SOURCE_KINDS)
def test_t5_start_slot_is_dropped_and_gradient_reaches_the_caption(
    kind: str, t5_sources: dict, t5: T5TokenizerFast, t5_embedding: torch.nn.Embedding
) -> None:
    """Whatever the start slot holds (a special, a soft mix), the output starts with the caption's first word
    and the slot gets no gradient; every valid caption position gets one, masked positions none."""
    source, bridge = t5_sources[kind]
    ids, mask = _caption_rows(source, CAPTIONS)
    probs = _one_hot(ids, bridge).repeat(3, 1, 1)
    probs[2:4, 0] = _one_hot(torch.tensor(source.pad_token_id), bridge)
    probs[4:, 0] = torch.rand(bridge.source_vocab_size, generator=torch.Generator().manual_seed(0)).softmax(0)
    probs.requires_grad_()
    embeds = bridge.embed(probs, mask.repeat(3, 1), t5_embedding)
    assert torch.equal(embeds, embeds[:2].repeat(3, 1, 1))
    first_word = t5_embedding.weight[t5.convert_tokens_to_ids("▁a")]
    assert all(torch.equal(row, first_word) for row in embeds[:, 0])
    embeds.square().sum().backward()
    caption = mask.repeat(3, 1).bool()
    caption[:, 0] = False
    gradient_norms = probs.grad.norm(dim=-1)
    assert (gradient_norms[caption] > 0).all() and (gradient_norms[~caption] == 0).all()


# T5 keeps "." with the word before ("run."): a start-marker source's "." continues, unlike CLIP's ".</w>".
T5_MULTI_PIECE_TOKENS = {
    "byte_level": ["a", "Ġdog", "s", "Ġrun", "."],
    "sentencepiece": ["▁a", "▁dog", "s", "▁run", "<0x2E>"],
    "t5": ["▁a", "▁dog", "s", "▁run", "."],
}


@pytest.mark.parametrize("kind", T5_MULTI_PIECE_TOKENS)
def test_t5_word_starts_follow_each_token_and_the_text_start(
    kind: str, clip: CLIPTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """ "s" and "." continue the word before them, so they read without "▁"; byte-level BPE's "a" has no "Ġ"
    yet starts the text, where T5 always writes "▁"."""
    folder = tmp_path_factory.mktemp("t5_hand")
    t5 = _t5_tokenizer(HAND_WORDS, folder / "t5")
    source = t5 if kind == "t5" else _source_tokenizer(kind, HAND_WORDS, folder, clip)
    bridge = VocabularyBridge.build(source, t5, max_length=8)
    ids, mask = _caption_rows(source, [MULTI_PIECE_CAPTION])
    assert source.convert_ids_to_tokens(ids[0, 1:-1].tolist()) == T5_MULTI_PIECE_TOKENS[kind]
    hard_ids = _t5_ids(t5, [MULTI_PIECE_CAPTION], 8)
    assert t5.convert_ids_to_tokens(hard_ids[0, :6].tolist()) == T5_MULTI_PIECE_TOKENS["t5"] + ["</s>"]
    embedding = torch.nn.Embedding(len(t5), 4)
    assert torch.equal(bridge.embed(_one_hot(ids, bridge), mask, embedding), embedding(hard_ids))
    expected_continues = [1, 0, 1, 0, 1] if kind == "byte_level" else [0, 0, 1, 0, 1]
    assert bridge.continuation[ids[0, 1:-1]].tolist() == expected_continues


def test_t5_each_token_picks_its_own_recipe_and_specials_map_by_role(
    wordpiece: BertTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A position's mass splits by token, not by position: 0.3 "##s" + 0.7 "dog" reads 0.3 "s" + 0.7 "▁dog".
    [CLS] and bos ([DEC]) stand for nothing (T5 has no bos): a zero embedding and unmapped mass."""
    t5 = _t5_tokenizer(HAND_WORDS, tmp_path_factory.mktemp("t5_roles"))
    bridge = VocabularyBridge.build(wordpiece, t5, max_length=8)
    embedding = torch.nn.Embedding(len(t5), 4).requires_grad_(False)

    def rows(*pieces: str) -> torch.Tensor:
        return embedding.weight[t5.convert_tokens_to_ids(list(pieces))]

    probs = _soft(
        wordpiece,
        [{"[DEC]": 1.0}, {"##s": 1.0}, {"##s": 0.3, "dog": 0.7}, {"[CLS]": 0.5, "run": 0.5}, {"[SEP]": 1.0}],
    )
    embeds = bridge.embed(probs, torch.ones(1, 5), embedding)[0]
    assert torch.equal(embeds[0], rows("▁", "s").mean(dim=0))  # the text's first word: "▁s" is not a piece
    torch.testing.assert_close(embeds[1], 0.3 * rows("s")[0] + 0.7 * rows("▁dog")[0])
    torch.testing.assert_close(embeds[2], 0.5 * rows("▁run")[0])
    assert torch.equal(embeds[3:], rows("</s>", "<pad>", "<pad>", "<pad>", "<pad>"))
    assert bridge.mass_coverage(probs, torch.ones(1, 5)) == pytest.approx(1 - 0.5 / 5)

    def final_recipe(token: str) -> list[str]:
        return _recipe(bridge, "final", wordpiece.convert_tokens_to_ids(token), t5)

    assert final_recipe("[DEC]") == final_recipe("[CLS]") == []
    assert final_recipe("[SEP]") == ["</s>"] and final_recipe("[PAD]") == ["<pad>"]
    assert final_recipe("[UNK]") == final_recipe("[MASK]") == ["<unk>"]
    assert final_recipe("über") == ["<unk>"]  # "ü" is outside the tiny T5 alphabet (ASCII)
    assert bridge.unmapped[wordpiece.convert_tokens_to_ids("über")]


def test_t5_a_token_spanning_words_drops_only_its_first_words_marker(t5: T5TokenizerFast) -> None:
    """A continuing piece with a space inside ("s▁dog" in SentencePiece models that merge across spaces):
    only its first word joins the word before; marked, it is T5's own tokenization of the text."""
    target = TargetPieces(t5)
    words = target.words("s dog")
    assert words == ("s", "dog")
    assert t5.convert_ids_to_tokens(target.pieces(words, marked=False)) == ["s", "▁dog"]
    assert target.pieces(words, marked=True) == t5("s dog", add_special_tokens=False).input_ids


def test_t5_into_itself_maps_every_piece_to_itself(t5: T5TokenizerFast) -> None:
    """Read inside a text, each regular T5 piece is itself; only "▁" alone (a space, no text) is unmapped."""
    bridge = VocabularyBridge.build(t5, t5)
    specials = set(t5.all_special_ids)
    regular = [token_id for token_id in range(len(t5)) if token_id not in specials]
    unmapped = [token_id for token_id in regular if bridge.unmapped[token_id]]
    assert t5.convert_ids_to_tokens(unmapped) == ["▁"]
    mapped = torch.tensor([token_id for token_id in regular if token_id not in unmapped])
    assert torch.equal(bridge.inner_index[mapped, 0], mapped)
    assert (bridge.inner_weight[mapped, 0] == 1).all() and (bridge.inner_weight[mapped, 1:] == 0).all()


def test_t5_coverage_per_source_kind(t5_sources: dict, t5: T5TokenizerFast) -> None:
    """Shares for the tiny vocabularies. WordPiece: every whole word is "▁word"; "##" pieces read exact inside
    a word, their "▁"-started form splits. The byte-level and byte-fallback sources' unk share is their bytes
    with no text. T5 into itself: every piece but "▁" is exact inside a text."""
    coverage = {kind: bridge.coverage() for kind, (_, bridge) in t5_sources.items()}
    for kind, (source, _) in t5_sources.items():
        shares = coverage[kind]
        assert shares["source_exact"] + shares["source_pieces"] + shares["source_unk"] == pytest.approx(1)
        assert pair_coverage(source, t5) == shares
        assert describe_coverage(shares).startswith("captioner tokens -> generator: exact ")
    assert coverage["wordpiece"]["source_unk"] == 0.0
    assert coverage["wordpiece"]["source_inner_exact"] > coverage["wordpiece"]["source_exact"] > 0.7
    assert coverage["t5"]["source_inner_exact"] == pytest.approx(1 - coverage["t5"]["source_unk"])
    for kind in ("byte_level", "sentencepiece"):
        assert 0.1 < coverage[kind]["source_unk"] < 0.2  # bytes 0x80-0xFF, control characters, spaces
    words = {t5.convert_tokens_to_ids("▁" + word) for word in default_vocabulary()}
    for _, bridge in t5_sources.values():
        assert words <= _reached_ids(bridge)  # every word of the list reaches T5's whole-word piece


def test_t5_target_errors_are_named(clip: CLIPTokenizer, t5: T5TokenizerFast) -> None:
    with pytest.raises(ValueError, match="marks word ENDS"):
        VocabularyBridge.build(clip, t5)
    byte_level = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(HAND_WORDS, list(BPE_SPECIALS.values())), **BPE_SPECIALS
    )
    with pytest.raises(ValueError, match="or a SentencePiece Unigram whose pre-tokenizer starts every word"):
        VocabularyBridge.build(t5, byte_level)
