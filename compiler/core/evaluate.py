"""Measure an artifact against the fp32 model on held-out inputs.

* Language models: per-position KL divergence KL(p_fp32 || p_quant) of the
  next-token distributions, top-1 agreement, perplexity of both models on the
  held-out text, and the greedy continuation of a prompt (tokens that agree).
* Encoders: cosine similarity of the output embeddings.
* Anything else: cosine similarity and relative error of every output.
* Latency: median wall time of one forward pass at T=1 and T=128 with a fixed
  thread count, for both models in the same process, reported as a ratio.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def lm_metrics(ref_logits: Sequence[np.ndarray], q_logits: Sequence[np.ndarray], ids: Sequence[np.ndarray]) -> dict[str, float]:
    """KL, top-1 agreement and perplexities over batches of logits [B, T, V]."""
    kl_sum = agree = count = 0.0
    nll_ref = nll_q = 0.0
    n_nll = 0
    for ref, q, tok in zip(ref_logits, q_logits, ids):
        lp_ref, lp_q = log_softmax(ref), log_softmax(q)
        kl_sum += float((np.exp(lp_ref) * (lp_ref - lp_q)).sum())
        agree += float((ref.argmax(-1) == q.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
        target = tok[:, 1:]
        nll_ref -= float(np.take_along_axis(lp_ref[:, :-1], target[..., None], -1).sum())
        nll_q -= float(np.take_along_axis(lp_q[:, :-1], target[..., None], -1).sum())
        n_nll += target.size
    ppl_ref, ppl_q = float(np.exp(nll_ref / n_nll)), float(np.exp(nll_q / n_nll))
    return {
        "kl": kl_sum / count,
        "top1_agreement": agree / count,
        "perplexity_fp32": ppl_ref,
        "perplexity": ppl_q,
        "perplexity_increase": ppl_q / ppl_ref - 1.0,
        "positions": int(count),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, 1e-30)


def output_metrics(ref: Sequence[np.ndarray], q: Sequence[np.ndarray]) -> dict[str, float]:
    cos = np.concatenate([cosine(r, x) for r, x in zip(ref, q)])
    # in float64: float32 squares of outputs past 1.8e19 overflow, and the error would read NaN
    rel = [np.linalg.norm(np.subtract(x, r, dtype=np.float64)) / max(np.linalg.norm(np.asarray(r, np.float64)), 1e-30)
           for r, x in zip(ref, q)]
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "relative_error": float(np.mean(rel))}


def run_batches(session: ort.InferenceSession, feeds: Sequence[dict[str, np.ndarray]], output: int = 0) -> list[np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in f.items() if k in names})[output] for f in feeds]


def greedy(session: ort.InferenceSession, prompt: list[int], steps: int, eos: int | None = None) -> list[int]:
    """Greedy continuation (full re-run per token: the artifact has no KV cache)."""
    ids = list(prompt)
    name = session.get_inputs()[0].name
    for _ in range(steps):
        logits = session.run(None, {name: np.array([ids], dtype=np.int64)})[0]
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        if eos is not None and nxt == eos:
            break
    return ids[len(prompt):]


def median_latency(session: ort.InferenceSession, feed: dict[str, np.ndarray], *, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def latency_comparison(
    ref: ort.InferenceSession, q: ort.InferenceSession, feeds: dict[str, dict[str, np.ndarray]], *, repeats: int
) -> dict[str, Any]:
    """Median seconds per forward for both models; speedup = fp32 / quantized."""
    out = {}
    for label, feed in feeds.items():
        # Interleave the two models so machine noise hits both alike.
        t_ref, t_q = [], []
        for _ in range(3):
            t_ref.append(median_latency(ref, feed, repeats=max(1, repeats // 3)))
            t_q.append(median_latency(q, feed, repeats=max(1, repeats // 3)))
        r, x = float(np.median(t_ref)), float(np.median(t_q))
        out[label] = {"fp32_ms": r * 1e3, "ms": x * 1e3, "speedup": r / x}
    return out
