"""The tiny tokenizers of each kind carry the real boundary markers, and every vocabulary word is one token."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from cycletune.models.tiny_vocabulary import byte_level_bpe, default_vocabulary, sentencepiece_bpe

WORDS = list(default_vocabulary())


def test_byte_level_bpe_marks_word_starts_with_g_and_keeps_every_word_whole() -> None:
    tokenizer = byte_level_bpe(WORDS, ["<pad>", "</s>"])
    assert tokenizer.encode("a red circle, left").tokens == ["a", "Ġred", "Ġcircle", ",", "Ġleft"]
    for word in WORDS:
        assert len(tokenizer.encode(word).tokens) == 1 and len(tokenizer.encode(f" {word}").tokens) == 1, word


def test_sentencepiece_bpe_marks_word_starts_and_falls_back_to_ordinary_byte_pieces() -> None:
    tokenizer = sentencepiece_bpe(WORDS, ["<unk>", "<s>", "</s>"])
    assert tokenizer.encode("a red circle.").tokens == ["▁a", "▁red", "▁circle", "<0x2E>"]
    # Llama's layout: the specials, then the 256 byte pieces, then the merges.
    assert [tokenizer.token_to_id(token) for token in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [
        0,
        1,
        2,
        3,
        258,
    ]
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")
    ids = wrapped("a red circle. zq")["input_ids"]
    assert wrapped.decode(ids, skip_special_tokens=True) == "a red circle. zq"
    for word in WORDS:
        assert len(tokenizer.encode(word).tokens) == 1, word
