"""Tokenizers behind one small interface.

Passes never tokenize, but calibration, evaluation and sample inputs need real
token ids, and reports need to turn ids back into text. Every model adapter
therefore carries an object with the `Tokenizer` shape below:

- `encode(text)` returns ids with *no* special tokens added (the caller decides
  about BOS / [CLS]);
- `decode(ids)` returns text, skipping control tokens (BOS/EOS/PAD);
- `bos_id`, `eos_id`, `pad_id` (None where the vocabulary has none), `vocab_size`.

Three implementations: `SentencePieceTokenizer` (a `.model` file, e.g. the
`tok512.model` of llama2.c's stories models), `Llama2cTokenizer` (llama2.c's own
`tokenizer.bin` / `tok512.bin`, with llama2.c's greedy score-ordered BPE merge
for encoding, so a checkpoint shipped with only that file still works) and
`HFTokenizer` (a wrapped `transformers.AutoTokenizer`).
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from lowbit.compiler.core.errors import InputError


@runtime_checkable
class Tokenizer(Protocol):
    """What adapters, calibration and evaluation need from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _none_if_negative(i: int | None) -> int | None:
    return None if i is None or i < 0 else int(i)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (the `sentencepiece` package does the work)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise InputError(f"not a SentencePiece model: {self.path} ({e})") from None
        self.bos_id = _none_if_negative(self._sp.bos_id())
        self.eos_id = _none_if_negative(self._sp.eos_id())
        self.pad_id = _none_if_negative(self._sp.pad_id())
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    """llama2.c's tokenizer file: int32 max_token_length, then per token a float32
    merge score, an int32 length and the UTF-8 bytes of the piece ('▁' already
    replaced by ' ').  Ids 0/1/2 are <unk>/<s>/</s>; pieces `<0xXX>` are the raw
    byte fallbacks (id = byte + 3), as in llama2.c's `run.c`. Like `run.c` it
    does not normalize text: SentencePiece collapses runs of spaces, this does not.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        self.path = Path(path)
        data = self.path.read_bytes()
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        try:
            while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
                score, n = struct.unpack_from("<fi", data, off)
                if n < 0 or off + 8 + n > len(data):
                    raise struct.error(f"piece {len(pieces)} has length {n}")
                pieces.append(data[off + 8 : off + 8 + n])
                scores.append(score)
                off += 8 + n
        except struct.error as e:
            raise InputError(f"not a llama2.c tokenizer file: {self.path} ({e})") from None
        if len(pieces) < 3 or (vocab_size is not None and len(pieces) != vocab_size):
            raise InputError(
                f"llama2.c tokenizer {self.path} holds {len(pieces)} pieces, model needs {vocab_size}"
            )
        self.pieces, self.scores = pieces, scores
        self._index = {p: i for i, p in reversed(list(enumerate(pieces)))}
        # encode may merge word by word: a space is a piece of its own, no piece holds
        # a space after its first byte, and no byte-fallback piece is empty
        self._space_splits = (
            b" " in self._index
            and not any(b" " in p[1:] for p in pieces)
            and len(pieces) > 258
            and all(pieces[3 : 3 + 256])
        )
        self.bos_id, self.eos_id, self.pad_id = 1, 2, None
        self.vocab_size = len(pieces)

    def encode(self, text: str) -> list[int]:
        """run.c's `encode`: dummy-prefix space, one id per code point (or its
        UTF-8 bytes as byte tokens), then repeatedly merge the adjacent pair whose
        merged piece has the highest score (the leftmost such pair on a tie).

        The merges run on a heap of candidate pairs over a linked list of
        symbols (`_merge`), so a long text costs O(n log n), not O(n^2). Where
        no piece holds a space after its first byte (`_space_splits`), no merge
        joins a symbol to a following one that starts with a space, so the text
        is merged word by word, each distinct word (with its leading space) once:
        the same ids as merging the whole text, since every merge the whole-text
        loop picks is also the best one left inside its own word."""
        if not text:
            return []
        if not self._space_splits:
            return self._merge(self._symbols(" " + text))
        out: list[int] = []
        done: dict[str, list[int]] = {}
        for part in text.split(" "):  # " " + text cut before each space
            ids = done.get(part)
            if ids is None:
                ids = done[part] = self._merge(self._symbols(" " + part))
            out.extend(ids)
        return out

    def _symbols(self, text: str) -> list[int]:
        """One id per code point, or the code point's UTF-8 bytes as byte tokens."""
        index = self._index
        ids: list[int] = []
        for ch in text:
            i = index.get(ch.encode("utf-8"))
            if i is not None:
                ids.append(i)
            else:
                ids.extend(x + 3 for x in ch.encode("utf-8"))
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Greedy BPE: merge the best-scoring adjacent pair (leftmost on a tie)
        until none is a piece. Symbols are nodes of a linked list numbered by
        their first position, so a lower node number is further left; the heap
        holds (-score, left node, right node, left id, right id, merged id) and
        an entry is stale (skipped) once either node's id or the link changed."""
        n = len(ids)
        if n < 2:
            return ids
        index, pieces, scores = self._index, self.pieces, self.scores
        tok = list(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for k in range(n - 1):
            a, b = tok[k], tok[k + 1]
            j = index.get(pieces[a] + pieces[b])
            if j is not None:
                heap.append((-scores[j], k, k + 1, a, b, j))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, k, r, a, b, j = pop(heap)
            if tok[k] != a or nxt[k] != r or tok[r] != b:
                continue
            tok[k], tok[r] = j, -1  # node r joins node k
            nr = nxt[r]
            nxt[k] = nr
            if nr >= 0:
                prv[nr] = k
                c = tok[nr]
                m = index.get(pieces[j] + pieces[c])
                if m is not None:
                    push(heap, (-scores[m], k, nr, j, c, m))
            p = prv[k]
            if p >= 0:
                c = tok[p]
                m = index.get(pieces[c] + pieces[j])
                if m is not None:
                    push(heap, (-scores[m], p, k, c, j, m))
        out, k = [], 0
        while k >= 0:
            out.append(tok[k])
            k = nxt[k]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in (self.bos_id, self.eos_id):
                continue
            piece = self.pieces[i]
            m = _BYTE_PIECE.match(piece)
            piece = bytes([int(m.group(1), 16)]) if m else piece
            if not out and piece.startswith(b" "):  # the dummy prefix, as SentencePiece drops it
                piece = piece[1:]
            out += piece
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Llama2cTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A `transformers` tokenizer (`AutoTokenizer`) behind the `Tokenizer` interface."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        self.pad_id = hf_tokenizer.pad_token_id
        self.cls_id = getattr(hf_tokenizer, "cls_token_id", None)
        self.sep_id = getattr(hf_tokenizer, "sep_token_id", None)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        # verbose=False: long calibration texts are cut into windows later, so no length warning
        return list(self.hf.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> Tokenizer:
    """Open a tokenizer file or folder: SentencePiece `.model`, llama2.c `.bin`,
    or a Hugging Face tokenizer folder / `tokenizer.json`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"tokenizer not found: {path}")
    if path.is_dir():  # a folder written by save_tokenizer holds one of these
        for saved in ("tokenizer.model", "tokenizer.bin"):
            if (path / saved).is_file():
                path = path / saved
                break
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".bin":
        return Llama2cTokenizer(path, vocab_size)
    if path.is_file() and path.suffix != ".json":  # else the folder around it would be read as a tokenizer
        raise InputError(f"not a tokenizer file: {path} (expected a SentencePiece .model, a llama2.c .bin, "
                         "a tokenizer.json or a Hugging Face tokenizer folder)")
    from transformers import AutoTokenizer

    folder = path if path.is_dir() else path.parent
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer from {path}: {e}") from None


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> dict[str, str]:
    """Write ``tokenizer`` into ``folder`` so that ``load_tokenizer(folder)`` reads it back."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
        kind = "sentencepiece"
    elif isinstance(tokenizer, Llama2cTokenizer):
        shutil.copyfile(tokenizer.path, folder / "tokenizer.bin")
        kind = "llama2c"
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.hf.save_pretrained(str(folder))
        kind = "huggingface"
    else:
        raise InputError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
    return {"kind": kind, "path": folder.name}
