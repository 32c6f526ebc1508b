"""Calibration and evaluation text, kept apart.

A text source (``--calib-data FILE``, or the built-in default: the English
prose of Python's ``pydoc_data.topics``, present on every Python install) is
tokenised once and cut into windows of ``seq_len`` tokens. Calibration takes
windows from the front 80% of the tokens, evaluation from the back 20%
(``--eval-data FILE`` gives evaluation its own source instead), so no
evaluation token was seen by calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lowbit.compiler.core.errors import InputError

CALIB_FRACTION = 0.8


@dataclasses.dataclass
class TextSplit:
    source: str
    calibration: list[list[int]]
    evaluation: list[list[int]]
    tokens: int


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path, what: str = "calibration/evaluation data") -> str:
    """The text of a data file: UTF-8, not empty, not binary (``what`` names it in errors: "--calib-data")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read it: {e.strerror or e}") from None
    if not text.strip():
        raise InputError(f"{what} {path} is empty")
    if "\x00" in text:
        raise InputError(f"{what} {path} is not a text file (it holds NUL bytes)")
    return text


def windows(tokens: list[int], seq_len: int, count: int, bos: int | None) -> list[list[int]]:
    """Up to ``count`` evenly spread, non-overlapping windows of ``seq_len`` tokens."""
    body = seq_len - (1 if bos is not None else 0)
    n_avail = len(tokens) // body
    if n_avail == 0:
        return []
    picks = np.linspace(0, n_avail - 1, min(count, n_avail)).round().astype(int)
    out = []
    for i in dict.fromkeys(picks.tolist()):
        w = tokens[i * body : (i + 1) * body]
        out.append(([bos] if bos is not None else []) + w)
    return out


def split_text(
    tokenizer,
    *,
    calib_data: str | Path | None,
    eval_data: str | Path | None,
    calib_samples: int,
    eval_samples: int,
    seq_len: int,
) -> TextSplit:
    text = read_text(calib_data) if calib_data else builtin_text()
    source = str(calib_data) if calib_data else "builtin:pydoc_data.topics"
    tokens = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    if eval_data:
        calib_tokens, eval_tokens = tokens, tokenizer.encode(read_text(eval_data))
        source += f" | eval: {eval_data}"
    else:
        cut = int(len(tokens) * CALIB_FRACTION)
        calib_tokens, eval_tokens = tokens[:cut], tokens[cut:]
    calib = windows(calib_tokens, seq_len, calib_samples, bos)
    evals = windows(eval_tokens, seq_len, eval_samples, bos)
    if not calib:
        raise InputError(f"calibration data {source} has fewer than {seq_len} tokens")
    if eval_data and not evals:  # the text given to verify on verifies nothing
        raise InputError(f"evaluation data {eval_data} has fewer than {seq_len} tokens")
    return TextSplit(source, calib, evals, len(tokens))


def batched(feeds: Sequence[dict[str, np.ndarray]], max_tokens: int) -> list[dict[str, np.ndarray]]:
    """Consecutive feeds of equal shapes stacked along the batch axis, at most ``max_tokens`` per batch.

    Fewer, larger runs: every sample of a compile's evaluation has the same
    length, and per-token or per-tensor quantization does not mix samples.
    """
    out: list[list[dict[str, np.ndarray]]] = []
    for f in feeds:
        tokens = max((a.size for a in f.values()), default=1)
        cur = out[-1] if out else None
        if (
            cur is not None
            and (len(cur) + 1) * tokens <= max_tokens
            and all(k in f and np.asarray(f[k]).shape == np.asarray(v).shape for k, v in cur[0].items())
        ):
            cur.append(f)
        else:
            out.append([f])
    return [{k: np.concatenate([np.asarray(f[k]) for f in group]) for k in group[0]} for group in out]
