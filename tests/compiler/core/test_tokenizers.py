"""Tokenizers: llama2.c's tokenizer.bin agrees with the SentencePiece model of the same vocabulary."""

import random
import time

import pytest

from lowbit.compiler.core.data import builtin_text
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


def _reference_encode(tok, text):
    """The quadratic llama2.c encode that `Llama2cTokenizer.encode` replaced: rescan every pair
    for the best-scoring merge (leftmost on a tie), merge it, repeat."""
    if not text:
        return []
    ids = []
    for ch in " " + text:
        b = ch.encode("utf-8")
        i = tok._index.get(b)
        ids.extend([i] if i is not None else [x + 3 for x in b])
    while True:
        best, at, merged = None, -1, -1
        for k in range(len(ids) - 1):
            j = tok._index.get(tok.pieces[ids[k]] + tok.pieces[ids[k + 1]])
            if j is not None and (best is None or tok.scores[j] > best):
                best, at, merged = tok.scores[j], k, j
        if best is None:
            return ids
        ids[at : at + 2] = [merged]


def _edge_and_random_texts(shared_dir):
    stories = (shared_dir.parent / "data" / "tinystories.txt").read_text()
    prose = builtin_text()  # pydoc_data.topics
    texts = [*TEXTS, "", " ", "   ", "é", "日", "\U0001F600", "\n", "\x00", "a" * 200, "ee" * 60, " " * 40,
             "the the  the   the", "x\U0001F600y  \t\r\n", stories[:3000], prose[:3000], prose[200_000:203_000]]
    rng = random.Random(0)
    alphabet = " \n\t.,!?'\"Lilyehtéß日本✓\x00\U0001F600" + "".join(map(chr, range(32, 127)))
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(150)]
    for _ in range(20):
        src = rng.choice([stories, prose])
        at = rng.randrange(len(src))
        texts.append(src[at : at + rng.randint(1, 600)])
    return texts


def test_llama2c_encode_matches_the_reference(toks, shared_dir):
    """Same ids as the quadratic merge loop, both word by word (this vocabulary) and on the whole text."""
    _, bin_ = toks
    whole = Llama2cTokenizer(bin_.path, 512)
    assert bin_._space_splits
    whole._space_splits = False  # the path for a vocabulary with spaces inside pieces
    for text in _edge_and_random_texts(shared_dir):
        ref = _reference_encode(bin_, text)
        assert bin_.encode(text) == ref, text
        assert whole.encode(text) == ref, text


def test_llama2c_encode_is_fast(toks, shared_dir):
    """500K characters (the default calibration text is ~465K) in well under 2 s (measured: 0.08 s
    word by word, 0.6 s on the whole text; the reference loop takes ~13 s for 20K, hours for 500K)."""
    _, bin_ = toks
    text = (builtin_text() + "\n\n" + (shared_dir.parent / "data" / "tinystories.txt").read_text())[:500_000]
    assert len(text) == 500_000
    start = time.perf_counter()
    ids = bin_.encode(text)
    assert time.perf_counter() - start < 2.0
    assert bin_.decode(ids) == text
    whole = Llama2cTokenizer(bin_.path, 512)
    whole._space_splits = False  # the heap on all 500K symbols at once: O(n log n) as well
    start = time.perf_counter()
    assert whole.encode(text) == ids
    assert time.perf_counter() - start < 6.0
