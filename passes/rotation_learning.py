"""Learn the residual-stream rotation ``Q`` the ``rotate`` pass folds into the weights.

Any orthogonal ``Q`` keeps the model's fp32 function; what it changes is how
well the rotated weights quantize. A random one is a lottery: on
SmolLM2-135M with 4-bit GPTQ weights, three seeds of the randomized Hadamard
give +7.2% to +9.1% perplexity (128 held-out windows; +9.9% unrotated).

Here ``Q = Q_0 · C(A)``: ``Q_0`` the randomized Hadamard the ``rotate`` pass
draws, ``C(A) = (I - A)^{-1} (I + A)`` the Cayley transform of a
skew-symmetric ``A = S - Sᵀ`` (orthogonal for every ``S``, the identity at
``S = 0``), and ``S`` follows Adam (cosine-decayed learning rate) on one of
two objectives:

* ``incoherence`` (OptRot, arXiv:2512.24124), data-free: the mean over the
  rotated weights of the kurtosis of their entries. Its error bounds for
  round-to-nearest and for GPTQ grow with a weight's largest entries relative
  to its energy; spreading them is what a rotation can do for the weights.
  Each step samples columns of every weight, so it takes a minute on
  SmolLM2-135M, and on its 128 held-out windows three seeds gave KL
  0.103-0.107 against 0.114-0.119 for the randomized Hadamard they started
  from (benchmarks/RESULTS.md).
* ``kl`` (SpinQuant, arXiv:2405.16406): the KL divergence between the fp32
  model's output distribution and that of the model with every linear that
  reads or writes the residual stream fake-quantized (round-to-nearest on the
  recipe's grid, straight-through gradients), over random calibration
  windows. The graph runs in torch (``lowbit.compiler.core.torch_graph``), so any
  graph the ``rotate`` pass accepts can be learned on. It learns against
  round-to-nearest, which GPTQ does not follow closely: on SmolLM2 it varied
  from +5.8% to +7.7% between compiles, at ten minutes each.

The result is kept only if it lowers its objective (over all calibration
windows for ``kl``, over all weight columns for ``incoherence``) against
``Q_0``; the notes record both values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lowbit.compiler.core.progress import progress
from lowbit.compiler.core.torch_graph import check_supported, graph_params, run_graph
from lowbit.passes.fold_norms import set_constant_input
from lowbit.passes.quantize_weights import Grid
from lowbit.passes.recognize import ResidualStream


class _RoundToGrid(torch.autograd.Function):
    """Round-to-nearest on a symmetric grid per group of rows; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:  # noqa: ARG004
        k, n = w.shape
        groups = -(-k // group_size)
        x = torch.cat([w, w.new_zeros(groups * group_size - k, n)]) if groups * group_size != k else w
        x = x.reshape(groups, group_size, n)
        scale = x.abs().amax(1, keepdim=True).clamp_min_(1e-12).div_(grid.half_range)
        q = (x / scale).round_().clamp_(grid.qmin, grid.qmax).mul_(scale)
        return q.reshape(groups * group_size, n)[:k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ARG004
        return grad, None, None


def fake_quantize(w: torch.Tensor, grid: Grid, group_size: int | None) -> torch.Tensor:
    """``w [K, N]`` rounded to ``grid`` per group of ``group_size`` rows (None: all ``K``), symmetric;
    the gradient passes straight through the rounding."""
    return _RoundToGrid.apply(w, grid, group_size or w.shape[0])


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(ref || softmax(logits)) along the last axis."""
    logq = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1).mean()


def _concat(feeds: Sequence[dict[str, Any]]) -> dict[str, np.ndarray] | None:
    """The feeds stacked along their first (batch) axis, or None when their shapes differ otherwise."""
    arrays = {k: [np.asarray(f[k]) for f in feeds] for k in feeds[0]}
    if any(a.ndim == 0 or a.shape[1:] != v[0].shape[1:] for v in arrays.values() for a in v):
        return None
    return {k: np.concatenate(v) for k, v in arrays.items()}


def _private(graph: ir.Graph, node: ir.Node, index: int) -> str:
    """The name of ``node.inputs[index]``, given its own initializer when others read it too."""
    value = node.inputs[index]
    if len(value.uses()) > 1 or value.is_graph_output() or value.is_graph_input():
        set_constant_input(graph, node, index, value.const_value.numpy())
    return node.inputs[index].name


def learn_rotation(
    graph: ir.Graph,
    stream: ResidualStream,
    start: np.ndarray,
    batches: Sequence[dict[str, Any]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    bits: int,
    group_size: int | None,
    seed: int,
    show_progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(Q, notes)``: the learned ``[d, d]`` rotation of ``stream`` (found in the unrotated
    ``graph``), starting from the orthogonal ``start``; ``Q`` is ``start`` when learning did not
    lower the fake-quantized KL over all ``batches``."""
    check_supported(graph)
    emb = [_private(graph, g, 0) for g in stream.embeddings]
    readers = [_private(graph, r, 1) for r in stream.readers]
    writers = [_private(graph, w.linear, 1) for w in stream.writers]
    biases = [_private(graph, *w.bias) for w in stream.writers if w.bias is not None]
    params = graph_params(graph)
    grid = Grid(bits, symmetric=True)
    q0 = torch.from_numpy(np.asarray(start, np.float64))

    def rotated(q: torch.Tensor) -> dict[str, torch.Tensor]:
        q = q.float()
        p = dict(params)
        for name in emb + biases:
            p[name] = params[name] @ q
        for name in readers:
            p[name] = fake_quantize(q.T @ params[name], grid, group_size)
        for name in writers:
            p[name] = fake_quantize(params[name] @ q, grid, group_size)
        return p

    with torch.no_grad():
        refs = [torch.log_softmax(run_graph(graph, b, params)[0].float(), -1) for b in batches]

    def loss_all(q: torch.Tensor) -> float:
        with torch.no_grad():
            p = rotated(q)
            return float(np.mean([float(_kl(r, run_graph(graph, b, p)[0])) for b, r in zip(batches, refs)]))

    def step_loss(q: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
        p = rotated(q)
        feeds = _concat([batches[i] for i in chosen])
        if feeds is not None:
            return _kl(torch.cat([refs[i] for i in chosen]), run_graph(graph, feeds, p)[0])
        return sum(_kl(refs[i], run_graph(graph, batches[i], p)[0]) for i in chosen) / len(chosen)

    before = loss_all(q0)
    rng = np.random.default_rng(seed)
    q, losses = _descend(
        q0, lambda q: step_loss(q, rng.choice(len(batches), min(batch_size, len(batches)), replace=False)),
        steps=steps, lr=lr, desc="rotate: learning the rotation (KL)", show_progress=show_progress,
    )  # fmt: skip
    after = loss_all(q)
    kept = after < before
    notes = {
        "objective": "kl", "steps": steps, "lr": lr, "batch_size": batch_size, "bits": bits, "group_size": group_size,
        "fake_quant_kl_start": before, "fake_quant_kl_learned": after,
        "kept": "learned" if kept else "start (learning did not lower the fake-quantized KL)",
        **_loss_ends(losses),
    }  # fmt: skip
    return (q.numpy() if kept else np.asarray(start, np.float64)), notes


def learn_incoherent_rotation(
    graph: ir.Graph,
    stream: ResidualStream,
    start: np.ndarray,
    *,
    steps: int,
    lr: float,
    columns: int = 64,
    seed: int,
    show_progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(Q, notes)``: the ``[d, d]`` rotation of ``stream`` (found in the unrotated ``graph``),
    starting from the orthogonal ``start``, that lowers :func:`incoherence` over every weight the
    rotation touches; each step samples ``columns`` columns of each weight, so every weight counts
    alike whatever its size. ``Q`` is ``start`` when learning did not lower it."""
    weights = stream_weights(graph, stream)
    q0 = torch.from_numpy(np.asarray(start, np.float64))
    gen = torch.Generator().manual_seed(seed)

    def step_loss(q: torch.Tensor) -> torch.Tensor:
        sample = torch.cat([x[:, torch.randint(x.shape[1], (columns,), generator=gen)] for x in weights], 1)
        return (q.float().T @ sample).pow(4).mean()

    before = incoherence(q0, weights)
    q, losses = _descend(q0, step_loss, steps=steps, lr=lr, desc="rotate: learning the rotation (incoherence)",
                         show_progress=show_progress)
    after = incoherence(q, weights)
    kept = after < before
    notes = {
        "objective": "incoherence", "steps": steps, "lr": lr, "columns": columns,
        "kurtosis_start": before, "kurtosis_learned": after,
        "kept": "learned" if kept else "start (learning did not lower the kurtosis)",
        **_loss_ends(losses),
    }  # fmt: skip
    return (q.numpy() if kept else np.asarray(start, np.float64)), notes


def stream_weights(graph: ir.Graph, stream: ResidualStream) -> list[torch.Tensor]:
    """Every weight a rotation ``Q`` of ``stream`` touches, as ``[d, n]`` columns ``x`` that ``Q``
    turns into ``Qᵀ x`` (readers as they are, writers and embedding tables transposed), each
    scaled to a mean square of 1."""
    readers = [r.inputs[1].const_value.numpy() for r in stream.readers]
    others = [w.linear.inputs[1] for w in stream.writers] + [g.inputs[0] for g in stream.embeddings]
    out = []
    for m in readers + [v.const_value.numpy().T for v in others]:
        t = torch.from_numpy(np.ascontiguousarray(m, np.float32))
        out.append(t / t.square().mean().sqrt().clamp_min(1e-30))
    return out


def incoherence(q: torch.Tensor, weights: Sequence[torch.Tensor], chunk: int = 8192) -> float:
    """Mean over ``weights`` (unit mean square, see :func:`stream_weights`) of the kurtosis
    ``mean(w⁴) / mean(w²)²`` of their entries after the rotation ``q``: 3 for Gaussian entries,
    1.8 for uniform ones, large where a few entries dominate."""
    q = q.float()
    with torch.no_grad():
        total = 0.0
        for x in weights:
            fourth = sum(float((q.T @ x[:, i : i + chunk]).pow(4).sum()) for i in range(0, x.shape[1], chunk))
            total += fourth / x.numel()
    return total / len(weights)


def _descend(
    q0: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor], *, steps: int, lr: float, desc: str,
    show_progress: bool,
) -> tuple[torch.Tensor, list[float]]:
    """``(Q_0 · C(A), losses)`` after ``steps`` Adam steps on ``loss(Q)`` over ``S`` (``A = S - Sᵀ``)."""
    d = q0.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    s = torch.zeros(d, d, dtype=torch.float64, requires_grad=True)

    def rotation() -> torch.Tensor:
        a = s - s.T
        return q0 @ torch.linalg.solve(eye - a, eye + a)

    opt = torch.optim.Adam([s], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))
    losses = []
    for _ in progress(range(steps), desc=desc, enabled=show_progress):
        value = loss(rotation())
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        losses.append(float(value.detach()))
    with torch.no_grad():
        return rotation(), losses


def _loss_ends(losses: list[float]) -> dict[str, float | None]:
    """The mean loss over the first and over the last tenth of the steps."""
    n = max(1, len(losses) // 10)
    return {"loss_first_steps": float(np.mean(losses[:n])) if losses else None,
            "loss_last_steps": float(np.mean(losses[-n:])) if losses else None}
