"""Verification, part of every compile: the artifact measured against the fp32 reference.

Both run as ONNX Runtime sessions or look-alikes (a backend's ``Built.session``) on
the held-out evaluation feeds: language models give perplexity, KL, top-1 agreement
and a greedy generation compared token by token; other models the cosine similarity
of their outputs. ``--max-drop`` turns the result into an error (no artifact), and
:func:`summary_text` gives the few human lines of ``summary.txt``.
"""

from __future__ import annotations

from typing import Any

from lowbit.compiler.core import evaluate
from lowbit.compiler.core.errors import AccuracyError, InputError

GENERATE_TOKENS = 32


def measure_accuracy(ref, art, adapter, data) -> dict[str, Any]:
    """The artifact's session ``art`` against the fp32 ``ref`` on ``data.evaluation`` (a ``CompileData``)."""
    feeds = data.evaluation
    if not feeds:
        return {"note": "no evaluation data"}
    ref_out = evaluate.run_batches(ref, feeds)
    art_out = evaluate.run_batches(art, feeds)
    task = getattr(adapter, "task", "generic")
    result: dict[str, Any] = {"samples": len(feeds), "tokens": data.eval_tokens, "source": data.source}
    if task == "causal-lm":
        result.update(evaluate.lm_metrics(ref_out, art_out, data.eval_ids))
        bos = adapter.tokenizer.bos_id
        prompt = [bos] if bos is not None else data.eval_ids[0][0, :4].tolist()
        g_ref = evaluate.greedy(ref, prompt, GENERATE_TOKENS)
        g_art = evaluate.greedy(art, prompt, GENERATE_TOKENS)
        same = next((i for i, (a, b) in enumerate(zip(g_ref, g_art)) if a != b), len(g_ref))
        result["generation"] = {
            "prompt_tokens": prompt,
            "tokens": GENERATE_TOKENS,
            "matching_prefix": same,
            "fp32_text": adapter.tokenizer.decode(g_ref),
            "text": adapter.tokenizer.decode(g_art),
        }
    else:
        result.update(evaluate.output_metrics(ref_out, art_out))
    return result


def measure_latency(ref, art, adapter, data) -> dict[str, Any]:
    """Median latency of ``art`` and ``ref`` (1 and 128 tokens for language models and encoders)."""
    feeds = {}
    source = data.evaluation or data.calibration
    if getattr(adapter, "task", None) in ("causal-lm", "encoder"):
        for t in (1, 128):
            ids = [[1 + (i % 100) for i in range(t)]]
            feeds[f"T={t}"] = adapter.make_inputs(ids)
    else:
        feeds["example"] = source[0]
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
            lines.append(f"greedy generation: {gen['matching_prefix']}/{gen['tokens']} tokens match fp32")
    elif "cosine_mean" in acc:
        lines.append(f"accuracy on {acc['samples']} held-out samples: cosine vs fp32 mean {acc['cosine_mean']:.5f}, min {acc['cosine_min']:.5f}")
    elif acc.get("note"):
        lines.append(f"accuracy: {acc['note']}")
    for label, row in lat.items():
        if isinstance(row, dict):
            lines.append(f"latency {label}: {row['ms']:.2f} ms vs fp32 {row['fp32_ms']:.2f} ms ({row['speedup']:.2f}x)")
    lines.append(f"compiled in {m['compile_seconds']:.1f} s")
    return "\n".join(lines) + "\n"
