"""Tokenizers: llama2.c's tokenizer.bin agrees with the SentencePiece model of the same vocabulary."""

import pytest
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import (
    Llama2cTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from lowbit.models.llama2c import find_tokenizer

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom said: \"I don't want to go!\"\nHe ran home, crying.",  # (SentencePiece would collapse "  ")
    "Café – naïve 日本 ✓",
    "x",
]


@pytest.fixture(scope="module")
def toks(shared_dir):
    d = shared_dir / "stories260K"
    return SentencePieceTokenizer(d / "tok512.model"), Llama2cTokenizer(d / "tok512.bin", 512)


@pytest.mark.parametrize("text", TEXTS)
def test_llama2c_bpe_matches_sentencepiece(toks, text):
    sp, bin_ = toks
    ids = sp.encode(text)
    assert bin_.encode(text) == ids
    assert bin_.decode(ids) == sp.decode(ids)


def test_special_ids_and_decode(toks):
    sp, bin_ = toks
    for t in toks:
        assert (t.bos_id, t.eos_id, t.vocab_size) == (1, 2, 512)
    ids = [1] + sp.encode("Once upon a time") + [2]
    assert sp.decode(ids) == bin_.decode(ids) == "Once upon a time"
    assert sp.encode("") == bin_.encode("") == []


def test_find_and_load(shared_dir, tmp_path):
    d = shared_dir / "stories260K"
    assert isinstance(find_tokenizer(d / "stories260K.bin", 512), SentencePieceTokenizer)
    assert find_tokenizer(tmp_path / "model.bin") is None
    assert isinstance(load_tokenizer(d / "tok512.bin"), Llama2cTokenizer)
    with pytest.raises(InputError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.bin").write_bytes(b"\x07\0\0\0" + b"\0\0\0\0" + b"\xff\xff\xff\x7f")
    with pytest.raises(InputError, match="not a llama2.c tokenizer file"):
        Llama2cTokenizer(tmp_path / "bad.bin")
    with pytest.raises(InputError, match="holds 512 pieces, model needs 32000"):
        Llama2cTokenizer(d / "tok512.bin", 32000)
