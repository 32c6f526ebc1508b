"""Calibration: stream activation statistics with bounded memory.

The graph runs in ONNX Runtime over the calibration batches with the tensors
of interest exposed as outputs. Each batch's tensors go into a
``TensorObserver`` and are then dropped, so memory is proportional to the
number of channels and histogram bins, never to the number of tokens:

* per-channel absmax (last axis), for smoothing and outlier reports;
* running min / max;
* histograms of positive values and of magnitudes of negative values on a
  fixed log-spaced grid (1e-8 .. 1e6), from which percentiles are read with
  a relative error of about 1% — enough to choose clipping ranges.

NaN or infinity in the data or in any observed tensor is an error naming the
tensor and batch: quantizing with such statistics would give garbage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.errors import CalibrationError
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.core.progress import progress

_EDGES = np.concatenate([[0.0], np.logspace(-8, 6, 2048)])
MAX_ROW_RANGES = 8192


@dataclasses.dataclass
class TensorObserver:
    """Streaming statistics of one tensor."""

    name: str
    channels: int = 0
    absmax: np.ndarray | None = None
    min: float = np.inf
    max: float = -np.inf
    count: int = 0
    pos_hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(_EDGES) - 1, np.int64))
    neg_hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(_EDGES) - 1, np.int64))
    rows: int = 0
    skew_sum: float = 0.0
    #: (max, min) of the first MAX_ROW_RANGES rows (ranges clamped to hold 0), for zero-point choice
    row_ranges: list = dataclasses.field(default_factory=list)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        flat = x.reshape(-1, x.shape[-1]) if x.ndim >= 1 and x.shape[-1] else x.reshape(-1, 1)
        if flat.size == 0:
            return
        if not np.isfinite(flat).all():
            raise CalibrationError(f"tensor {self.name!r} has NaN or infinite values on calibration data")
        ch_absmax = np.abs(flat).max(axis=0)
        if self.absmax is None:
            self.channels, self.absmax = flat.shape[1], ch_absmax
        else:
            self.absmax = np.maximum(self.absmax, ch_absmax)
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        self.count += flat.size
        self.pos_hist += np.histogram(flat[flat > 0], _EDGES)[0]
        self.neg_hist += np.histogram(-flat[flat < 0], _EDGES)[0]
        hi, lo = np.maximum(flat.max(axis=1), 0), np.minimum(flat.min(axis=1), 0)
        span = hi - lo
        self.skew_sum += float((np.abs(hi + lo)[span > 0] / span[span > 0]).sum())
        self.rows += flat.shape[0]
        kept = sum(len(r) for r in self.row_ranges)
        if kept < MAX_ROW_RANGES:
            self.row_ranges.append(np.stack([hi, lo], axis=1)[: MAX_ROW_RANGES - kept])

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """(low, high) clipping range holding ``percentile``% of each sign's values."""
        return -_quantile(self.neg_hist, percentile), _quantile(self.pos_hist, percentile)

    def abs_percentile(self, percentile: float) -> float:
        return _quantile(self.pos_hist + self.neg_hist, percentile)

    def row_skew(self) -> float:
        """Mean over rows (tokens) of |max + min| / (max - min), the range clamped to hold 0.

        0: every row spans [-a, a] (symmetric per-token quantization loses
        nothing); 1: rows are one-sided (symmetric quantization wastes half of
        its levels).
        """
        return self.skew_sum / self.rows if self.rows else 0.0

    def shared_zero_point(self) -> int | None:
        """The uint8 zero point z, one for all rows, that minimises the mean squared
        per-row step ``s_r = max(hi_r / (255 - z), -lo_r / z)`` over the observed rows
        (the quantization noise of per-token scales with a shared zero point); None
        without observed rows."""
        if not self.row_ranges:
            return None
        r = np.concatenate(self.row_ranges).astype(np.float64)
        z = np.arange(1, 255, dtype=np.float64)[:, None]
        steps = np.maximum(r[None, :, 0] / (255 - z), -r[None, :, 1] / z)
        return int(np.argmin((steps**2).mean(axis=1))) + 1

    def tensor_scale_bits(self) -> float | None:
        """Resolution lost (bits) when one dynamic range covers a whole run instead of each row.

        Over the observed rows, ``0.5 * log2(mean_r((R_run / R_r)^2))`` where ``R_r`` is a
        row's range (clamped to hold 0) and ``R_run`` the range of the calibration batch
        holding it (one run of the model): the mean increase of the quantization noise
        power relative to per-row (per-token) scales. 0 when all rows of a run have the
        same range; None without observed rows.
        """
        ratios = []
        for batch in self.row_ranges:
            span = batch[:, 0] - batch[:, 1]
            run = batch[:, 0].max() - batch[:, 1].min()
            ratios.append((run / span[span > 0]) ** 2)
        ratios = np.concatenate(ratios) if ratios else np.empty(0)
        return float(0.5 * np.log2(ratios.mean())) if ratios.size else None

    def outlier_ratio(self) -> float:
        """max / median of the per-channel absmax (large: a few outlier channels)."""
        if self.absmax is None:
            return 0.0
        med = float(np.median(self.absmax))
        return float(self.absmax.max() / med) if med > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        return {
            "min": self.min,
            "max": self.max,
            "count": self.count,
            "channels": self.channels,
            "absmax_max": float(self.absmax.max()) if self.absmax is not None else 0.0,
            "absmax_median": float(np.median(self.absmax)) if self.absmax is not None else 0.0,
            "outlier_ratio": round(self.outlier_ratio(), 2),
            "row_skew": round(self.row_skew(), 4),
            "tensor_scale_bits": None if (b := self.tensor_scale_bits()) is None else round(b, 3),
            "p99.99": self.abs_percentile(99.99),
        }


def _quantile(hist: np.ndarray, percentile: float) -> float:
    total = hist.sum()
    if total == 0:
        return 0.0
    idx = int(np.searchsorted(np.cumsum(hist), total * percentile / 100.0))
    return float(_EDGES[min(idx + 1, len(_EDGES) - 1)])


def check_inputs(batches: Sequence[dict[str, np.ndarray]]) -> None:
    if not batches:
        raise CalibrationError("no calibration data (the calibration text gave no samples)")
    for i, feed in enumerate(batches):
        for name, arr in feed.items():
            arr = np.asarray(arr)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise CalibrationError(f"calibration batch {i}: input {name!r} contains NaN or infinity")


def observe(
    model: ir.Model,
    tensors: Iterable[str],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    show_progress: bool = True,
) -> dict[str, TensorObserver]:
    """Run ``model`` over ``batches`` and observe the named tensors."""
    check_inputs(batches)
    names = list(dict.fromkeys(tensors))
    session = session_for(model, names)
    observers = {n: TensorObserver(n) for n in names}
    feeds_names = {i.name for i in session.get_inputs()}
    for i, feed in enumerate(progress(batches, desc="calibrating", unit="windows", enabled=show_progress)):
        missing = feeds_names - set(feed)
        if missing:
            raise CalibrationError(f"calibration batch {i} lacks inputs {sorted(missing)}")
        outs = session.run(names, {k: v for k, v in feed.items() if k in feeds_names})
        for name, arr in zip(names, outs):
            try:
                observers[name].update(arr)
            except CalibrationError as e:
                raise CalibrationError(f"{e} (batch {i})") from None
    return observers
