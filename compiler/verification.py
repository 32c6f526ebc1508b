"""Verification, part of every compile: the artifact measured against the fp32 reference.

Both run as ONNX Runtime sessions or look-alikes (a backend's ``Built.session``) on
the held-out evaluation feeds: language models give perplexity, KL, top-1 agreement
and the greedy continuation of a fixed English prompt (:data:`PROMPT`) by both models,
compared token by token; other models the cosine similarity of their outputs.

Greedy texts part at the first position where fp32's top two candidates are nearly tied
(any quantization flips some such ties, and everything after the flip differs), so the
summary says where they part and how close fp32's choice was there (its log-probability
margin over the artifact's token, :data:`NEAR_TIE` nats or less: a near-tie), not a count
of matching tokens; ``lowbit inspect`` prints both texts. ``--max-drop`` turns the result into an error (no artifact), and
:func:`summary_text` gives the few human lines of ``summary.txt``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.compiler.core import evaluate
from lowbit.compiler.core.errors import AccuracyError, InputError
from lowbit.compiler.core.progress import progress as show, step

GENERATE_TOKENS = 32
#: the prompt both models continue greedily (after the tokenizer's BOS, as ``lowbit run --prompt`` does)
PROMPT = "Once upon a time"
#: fp32's log-probability margin (nats) at or under which the first differing token is a near-tie
NEAR_TIE = 0.5


def measure_accuracy(ref, art, adapter, data, *, progress: bool = True) -> dict[str, Any]:
    """The artifact's session ``art`` against the fp32 ``ref`` on ``data.evaluation`` (a ``CompileData``)."""
    feeds = data.evaluation
    if not feeds:
        return {"note": "no evaluation data"}
    ref_out = evaluate.run_batches(ref, show(feeds, desc="verify: fp32 on held-out samples", unit="samples",
                                             enabled=progress))
    art_out = evaluate.run_batches(art, show(feeds, desc="verify: artifact on held-out samples", unit="samples",
                                             enabled=progress))
    task = getattr(adapter, "task", "generic")
    result: dict[str, Any] = {"samples": len(feeds), "tokens": data.eval_tokens, "source": data.source}
    if task == "causal-lm":
        result.update(evaluate.lm_metrics(ref_out, art_out, data.eval_ids))
        if getattr(adapter, "tokenizer", None) is None:
            return result  # no tokenizer, no prompt to continue
        with step(f"verify: greedy text after {PROMPT!r}, fp32 and artifact ({GENERATE_TOKENS} tokens each)",
                  enabled=progress):
            result["generation"] = compare_generation(ref, art, adapter.tokenizer)
    else:
        result.update(evaluate.output_metrics(ref_out, art_out))
    return result


def prompt_ids(tokenizer, prompt: str = PROMPT) -> list[int]:
    """``prompt`` through the tokenizer, after its BOS (what ``lowbit run --prompt`` feeds)."""
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + list(tokenizer.encode(prompt))


def compare_generation(ref, art, tokenizer, prompt: str = PROMPT, tokens: int = GENERATE_TOKENS) -> dict[str, Any]:
    """Both models' greedy continuations of ``prompt``: where they first differ (1-based, None: identical) and
    fp32's log-probability margin there between its token and the artifact's (small: a near-tie)."""
    ids = prompt_ids(tokenizer, prompt)
    g_ref = evaluate.greedy(ref, ids, tokens)
    g_art = evaluate.greedy(art, ids, tokens)
    same = next((i for i, (a, b) in enumerate(zip(g_ref, g_art)) if a != b), min(len(g_ref), len(g_art)))
    margin = None
    if same < min(len(g_ref), len(g_art)):
        name = ref.get_inputs()[0].name
        logits = ref.run(None, {name: np.array([ids + g_ref[:same]], dtype=np.int64)})[0][0, -1]
        logp = evaluate.log_softmax(logits)
        margin = float(logp[g_ref[same]] - logp[g_art[same]])
    return {
        "prompt": prompt,
        "prompt_tokens": ids,
        "tokens": tokens,
        "matching_prefix": same,
        "first_difference": None if margin is None else same + 1,
        "fp32_margin_nats": margin,
        "fp32_text": tokenizer.decode(g_ref),
        "text": tokenizer.decode(g_art),
    }


def generation_label(gen: dict[str, Any]) -> str:
    return f"greedy text after {gen['prompt']!r}" if gen.get("prompt") else "greedy text"


def generation_line(gen: dict[str, Any], *, short: bool = False) -> str:
    """The summary's line on the greedy texts: identical, or where they part and whether that was a near-tie;
    ``short``: without the label and the pointer to ``lowbit inspect`` (for a table row beside both texts)."""
    head = "" if short else generation_label(gen) + ": "
    if gen.get("first_difference") is None and gen["matching_prefix"] >= gen["tokens"]:
        return f"{head}the same {gen['tokens']} tokens as fp32"
    at = gen.get("first_difference") or gen["matching_prefix"] + 1
    margin = gen.get("fp32_margin_nats")
    if margin is None:
        why = ""
    elif margin <= NEAR_TIE:
        why = f", a near-tie (fp32 preferred its token by {margin:.2f} nats: expected after quantization)"
    else:
        why = f", not a near-tie (fp32 preferred its token by {margin:.2f} nats)"
    text = f"{head}first differs from fp32 at token {at} of {gen['tokens']}{why}"
    return text if short else text + "; both texts: lowbit inspect"


def measure_latency(ref, art, adapter, data, *, progress: bool = True) -> dict[str, Any]:
    """Median latency of ``art`` and ``ref`` (1 and 128 tokens for language models and encoders)."""
    feeds = {}
    source = data.evaluation or data.calibration
    if getattr(adapter, "task", None) in ("causal-lm", "encoder"):
        for t in (1, 128):
            ids = [[1 + (i % 100) for i in range(t)]]
            feeds[f"T={t}"] = adapter.make_inputs(ids)
    else:
        feeds["example"] = source[0]
    with step(f"verify: latency of fp32 and artifact ({', '.join(feeds)})", enabled=progress):
        out = evaluate.latency_comparison(ref, art, feeds, repeats=15)
    out["threads"] = ref.get_session_options().intra_op_num_threads
    return out


def check_drop(accuracy: dict[str, Any], max_drop: float | None) -> None:
    """``AccuracyError`` when the measured drop exceeds ``max_drop`` (``--max-drop``)."""
    if max_drop is None:
        return
    if "perplexity_increase" in accuracy:
        drop, what = accuracy["perplexity_increase"], "perplexity increase"
    elif "cosine_mean" in accuracy:
        drop, what = 1.0 - accuracy["cosine_mean"], "1 - cosine similarity"
    else:
        raise InputError("--max-drop needs evaluation data, and this compile has none")
    if drop > max_drop:
        raise AccuracyError(f"{what} {drop:.2%} exceeds --max-drop {max_drop:.2%}; no artifact written")


def summary_text(m: dict[str, Any]) -> str:
    """A few human lines: what was compiled, how it measures against fp32."""
    acc, lat, size = m["accuracy"], m.get("latency") or {}, m["size"]
    plan = m.get("plan") or {"layers": {}}
    counts: dict[str, int] = {}
    for lp in plan["layers"].values():
        counts[lp["precision"]] = counts.get(lp["precision"], 0) + 1
    lines = [
        f"lowbit {m['lowbit']} — {m['model']['name']} ({m['model']['task']}), recipe {m['recipe']['name']}, backend {m['backend']}",
        "layers: " + (", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "none planned"),
        f"weights: {size['weight_bytes'] / 1e6:.2f} MB ({size['ratio']:.2f}x of fp32 {size['fp32_weight_bytes'] / 1e6:.2f} MB)",
    ]
    if "perplexity" in acc:
        lines.append(
            f"accuracy on {acc['samples']} held-out samples ({acc['tokens']} tokens): perplexity {acc['perplexity']:.4g} "
            f"vs fp32 {acc['perplexity_fp32']:.4g} ({acc['perplexity_increase']:+.2%}), KL {acc['kl']:.2e}, "
            f"top-1 agreement {acc['top1_agreement']:.2%}"
        )
        gen = acc.get("generation")
        if gen:
            lines.append(generation_line(gen))
    elif "cosine_mean" in acc:
        lines.append(f"accuracy on {acc['samples']} held-out samples: cosine vs fp32 mean {acc['cosine_mean']:.5f}, min {acc['cosine_min']:.5f}")
    elif acc.get("note"):
        lines.append(f"accuracy: {acc['note']}")
    for label, row in lat.items():
        if isinstance(row, dict):
            lines.append(f"latency {label}: {row['ms']:.2f} ms vs fp32 {row['fp32_ms']:.2f} ms ({row['speedup']:.2f}x)")
    lines.append(f"compiled in {m['compile_seconds']:.1f} s")
    return "\n".join(lines) + "\n"
