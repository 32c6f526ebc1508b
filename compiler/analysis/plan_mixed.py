"""Plan a precision per linear from measured sensitivity and measured cost, under a budget.

Policy only, like ``plan``: the pass writes a plan and rewrites nothing.

1. **Candidates** (``lowbit.compiler.analysis.candidates``): fp32, W8A8, W8A16, W4A16 and W4A8
   at group sizes 32 and 128: what ``lower-ort`` runs. Only those the compile's backend
   runs are offered (``context.backend``, a ``core.backend.Backend``: its ``supports``;
   TVM drops W4A8); the notes say which were dropped and why, and whose costs were used.
2. **Sensitivity** (``lowbit.compiler.analysis.sensitivity``): for every (layer, candidate),
   the final-output KL divergence from fp32 (and the change of the next-token
   NLL) on calibration data when only that layer takes that candidate, measured
   in one ONNX Runtime session whose linears are ``If`` trees over their lowered
   candidates, selected by an input; a run for one layer starts at that layer (the
   fp32 prefix is fed, not recomputed). Cached on disk by model, weights,
   candidates and data. ``sensitivity = "scaled"`` measures one candidate per layer
   and scales it to the others by their local output errors (one run per layer).
3. **Cost** (``lowbit.compiler.analysis.costs``): bytes of each candidate lowered by the
   backend's lowering pass, and, for a backend whose kernels run in ONNX Runtime
   (``Backend.measures_latency``), its latency for the layer's shape measured by ORT
   micro-benchmarks at ``latency_seq_len`` tokens, in a reusable cost table. (The
   sensitivities are measured on ``lower-ort``'s kernels for every backend: ``lower-tvm``
   computes the same numbers for the same plan.)
4. **Solve** (``lowbit.compiler.analysis.allocate``): ``scipy.optimize.milp`` minimises the
   summed sensitivity (one candidate per layer) under the budget(s):

   * ``budget = "5.0bits"``: average bits per linear weight, scales and zero points
     included (each lowered layer's stored bytes x 8 / its weights, over all planned
     linears);
   * ``budget = "60MB"``: bytes of the artifact's weights (linears as planned, the rest
     as it will be stored: embedding tables as ``quantize-embeddings`` leaves them
     when ``quantized_embeddings``);
   * ``budget_latency = "0.5x"``: the fp32 model's latency at ``latency_seq_len``
     tokens, predicted as the measured latency of the model with its linears stubbed out
     (a broadcast of their output shape) plus the chosen candidates' micro-benchmarked
     times, scaled so that all-fp32 gives the fp32 model's measured latency (a cost
     table from another day or load keeps its ratios, not its absolute times; a size
     and a latency budget may be combined);
   * ``max_kl = 0.02`` / ``max_ppl_increase = "2%"``: the dual, the smallest plan (in
     bytes) whose predicted KL (or predicted perplexity ratio ``exp(sum dNLL)``) stays
     within the target.

   An infeasible budget is an ``InputError`` naming the nearest feasible one.
5. **Check**: the chosen plan is measured as a whole in the same session (the
   layers' interaction included); with ``pareto_points`` more budgets are solved
   and measured, giving the predicted-vs-measured curve ``lowbit report`` plots.

``overrides`` (``GLOB=PRECISION`` or ``GLOB=PRECISION-gGROUP``) and ``exclude`` pin
layers before solving; ``plan_file`` (``--plan``) takes a plan written by an earlier
compile (a ``manifest.json`` or a plan JSON) and skips the analysis.

Example recipe entry::

    [[passes]]
    pass = "plan-mixed"
    budget = "5.0bits"
    candidates = ["fp32", "w8a8", "w8a16", "w4a16-g32", "w4a16-g128", "w4a8-g32", "w4a8-g128"]
    samples = 8
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.compiler.analysis import allocate
from lowbit.compiler.analysis import costs as costs_mod
from lowbit.compiler.analysis import sensitivity as sens_mod
from lowbit.compiler.analysis.candidates import (
    DEFAULT_CANDIDATES,
    Candidate,
    parse_candidates,
)
from lowbit.compiler.analysis.costs import _median_ms
from lowbit.compiler.core.backend import get_backend
from lowbit.compiler.core.data import batched
from lowbit.compiler.core.errors import InputError, OptionError
from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.compiler.core.plan import LayerPlan, Plan, check_override_globs, parse_override, write_plan
from lowbit.passes import gptq
from lowbit.passes.quantize_embeddings import QuantizeEmbeddingsPass
from lowbit.passes.plan import planner_layer_names
from lowbit.passes.recognize import find_linears

NOTES_KEY = "plan-mixed"


class PlanMixedPrecisionPass(LowbitPass):
    """Choose each linear's precision from measured sensitivity and cost under a budget (metadata only).

    In place. Needs calibration batches in the compile context (a ``calibrate`` pass
    before it gives the per-token zero points the int8 kernels use). Give one of
    ``budget`` / ``budget_latency`` (or both), ``max_kl``, ``max_ppl_increase``; with
    none, ``budget = "5.0bits"``.

    Options: :attr:`Options` (the recipe keys, with their help).
    """

    name = "plan-mixed"

    @dataclasses.dataclass(frozen=True)
    class Options(PassOptions):
        budget: str = option("", 'size budget: "5.0bits" (average bits per linear weight, scales included) or "60MB" '
                                 "(artifact weight bytes).")
        budget_latency: str = option("", "latency budget as a fraction of the fp32 model's at latency_seq_len tokens, "
                                         'e.g. "0.5x".')
        max_kl: float = option(0.0, "the smallest plan whose predicted KL from fp32 is at most this (0: unused).")
        max_ppl_increase: str = option("", "the smallest plan whose predicted perplexity increase is at most this, "
                                           'e.g. "2%" ("": unused).')
        candidates: list[str] | None = option(None, "what each linear may become: fp32, w8a8, w8a16, w4a16-gG, "
                                                    "w4a8-gG (G: group size).")
        samples: int = option(8, "calibration batches the sensitivities are measured on.")
        sensitivity: str = option("exact", '"exact" (one run per layer and candidate) or "scaled" (one run per layer, '
                                           "the other candidates scaled by their local output error; see "
                                           "compiler/analysis/sensitivity.py).")
        max_tokens: int = option(2048, "tokens per ONNX Runtime run (batches are stacked up to this).")
        weight_algorithm_8bit: str = option("rtn", 'weight algorithm of the 8-bit candidates ("rtn", "mse", "gptq").')
        weight_algorithm_4bit: str = option("gptq", 'weight algorithm of the 4-bit candidates ("rtn", "mse", "gptq").')
        act_order: bool = option(True, "GPTQ candidates quantize input features in order of decreasing Hessian "
                                       "diagonal.")
        exclude: list[str] | None = option(None, "glob patterns of layers kept in fp32.")
        overrides: list[str] | None = option(None, '"GLOB=PRECISION" items (PRECISION may carry a group: w4a16-g32) '
                                                   "pinning layers before solving.")
        plan_file: str = option("", "a plan to use as is (a manifest.json or plan JSON of an earlier compile): no "
                                    "analysis.")
        latency_seq_len: int = option(128, "tokens per run at which latencies are measured and a latency budget "
                                           "applies.")
        threads: int = option(2, "ONNX Runtime threads for every measurement.")
        measure_latency: bool = option(True, "measure each candidate's latency (needed by budget_latency; else bytes "
                                             "only).")
        cost_table: str = option("", 'JSON cost table to read and extend ("": ~/.cache/lowbit/costs.json).')
        cache: bool = option(True, "keep measured sensitivities in ~/.cache/lowbit (or $LOWBIT_CACHE) and reuse them.")
        pareto_points: int = option(6, "further budgets solved and measured for the predicted-vs-measured curve "
                                       "(0: none).")
        quantized_embeddings: bool = option(True, "count embedding tables as quantize-embeddings stores them (int8 "
                                                  "rows) in byte budgets.")
        time_limit: float = option(60.0, "seconds the solver may take per problem.")

        def __post_init__(self) -> None:
            # validate now, so a bad flag fails before any work
            for name, kind in (("budget", str), ("budget_latency", str), ("max_ppl_increase", str), ("plan_file", str),
                               ("cost_table", str), ("max_kl", float), ("time_limit", float)):
                self.normalize(name, kind(getattr(self, name) or kind()))
            for name, kind in (("samples", int), ("max_tokens", int), ("latency_seq_len", int), ("threads", int),
                               ("pareto_points", int), ("sensitivity", str), ("act_order", bool),
                               ("measure_latency", bool), ("cache", bool), ("quantized_embeddings", bool)):
                self.normalize(name, kind(getattr(self, name)))
            self.normalize("candidates", list(self.candidates or DEFAULT_CANDIDATES))
            self.normalize("exclude", list(self.exclude or []))
            self.normalize("overrides", list(self.overrides or []))
            self.require(self.sensitivity in ("exact", "scaled"), "sensitivity", "must be 'exact' or 'scaled'")
            self.require(self.max_kl >= 0 and math.isfinite(self.max_kl), "max_kl", "must be a finite number, not negative")
            self.require(self.samples >= 1, "samples", "must be >= 1")
            parsed = {name: self._parsed(name, parse) for name, parse in (
                ("budget", allocate.parse_budget), ("budget_latency", allocate.parse_latency),
                ("max_ppl_increase", lambda v: allocate.parse_fraction(v, "--max-ppl-increase")))}
            targets = [n for n, v in (("max_kl", self.max_kl or None), ("max_ppl_increase", parsed["max_ppl_increase"]))
                       if v is not None]
            self.require(len(targets) < 2, "max_ppl_increase",
                         "is refused: give one accuracy target: --max-kl or --max-ppl-increase, not both")
            if targets:
                flag = "--" + targets[0].replace("_", "-")
                self.require(not (parsed["budget"] or parsed["budget_latency"]), targets[0],
                             f"is refused: {flag} asks for the smallest plan meeting an accuracy target; it does not "
                             "combine with --budget / --budget-latency")
            self.require(parsed["budget_latency"] is None or self.measure_latency, "budget_latency",
                         "is refused: --budget-latency needs measured latencies (plan-mixed.measure_latency = true)")
            try:
                for c in parse_candidates(self.candidates):
                    c.layer_plan(weight_algorithm_8bit=self.weight_algorithm_8bit,
                                 weight_algorithm_4bit=self.weight_algorithm_4bit, act_order=self.act_order)
            except InputError as e:  # a candidate, or an algorithm of theirs
                raise OptionError(None, "candidates", self.candidates, f"is refused: {e}") from None
            for item in self.overrides:  # a precision no layer could take fails now, not after the analysis
                try:
                    Candidate.parse(parse_override(item, groups=True)[1]).layer_plan(
                        weight_algorithm_8bit=self.weight_algorithm_8bit,
                        weight_algorithm_4bit=self.weight_algorithm_4bit, act_order=self.act_order)
                except InputError as e:
                    raise InputError(e.args[0] if str(e).startswith("--override") else f"--override {item!r}: {e}") from None

        def _parsed(self, name: str, parse):
            value = getattr(self, name)
            try:
                return parse(value) if value else None
            except InputError as e:
                raise OptionError(None, name, value, f"is refused: {e}") from None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._size = allocate.parse_budget(self.budget) if self.budget else None
        self._latency = allocate.parse_latency(self.budget_latency) if self.budget_latency else None
        self._ppl = allocate.parse_fraction(self.max_ppl_increase, "--max-ppl-increase") if self.max_ppl_increase else None
        self._candidates = parse_candidates(self.candidates)

    def check_model(self, model: ir.Model) -> None:
        """Before any pass runs: every override's glob matches a layer of the imported model."""
        if self.overrides:
            check_override_globs(self.overrides, planner_layer_names(model), groups=True)

    # ------------------------------------------------------------------
    def _layer_plan(self, cand: Candidate, reason: str = "") -> LayerPlan:
        return cand.layer_plan(weight_algorithm_8bit=self.weight_algorithm_8bit,
                               weight_algorithm_4bit=self.weight_algorithm_4bit, act_order=self.act_order, reason=reason)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.metadata_props.get("lowbit.plan")
        linears, rejected = find_linears(model.graph)
        if not linears:
            raise InputError("the model has no quantizable linear layer (no MatMul/Gemm with a constant 2-D float weight)")
        if self.plan_file:
            plan = self._fed_plan(linears, rejected)
        else:
            plan = self._analyse(model, linears, rejected)
        write_plan(model, plan)
        return ir.passes.PassResult(model, model.metadata_props.get("lowbit.plan") != before)

    # ------------------------------------------------------------------
    def _fed_plan(self, linears, rejected) -> Plan:
        path = Path(self.plan_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--plan {path}: cannot read a plan: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("plan"), dict):
            data = data["plan"]  # a manifest
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise InputError(f"--plan {path}: not a plan (expected {{\"layers\": {{...}}}} or a manifest.json)")
        plan = Plan.from_json(data)
        names = [lin.name for lin in linears]
        missing = [n for n in names if n not in plan.layers]
        extra = [n for n in plan.layers if n not in names]
        if missing or extra:
            raise InputError(
                f"--plan {path} does not fit this model: "
                + "; ".join(p for p in (f"no entry for {len(missing)} layer(s), e.g. {missing[:3]}" if missing else "",
                                        f"{len(extra)} unknown layer(s), e.g. {extra[:3]}" if extra else "") if p)
            )
        plan.skipped.update(rejected)
        pinned = self._pinned(names)
        for name, (cand, why) in pinned.items():
            plan.layers[name] = self._layer_plan(cand, why)
        backend = get_backend(self.context.backend)
        refused = {n: why for n, lp in plan.layers.items() if (why := backend.supports(lp)) is not None}
        if refused:
            first = next(iter(refused))
            raise InputError(f"--plan {path}: --backend {backend.name} cannot run {len(refused)} of its layers, e.g. "
                             f"{first} ({plan.layers[first].precision}): {refused[first]}")
        self.context.notes[NOTES_KEY] = {"source": f"plan file {path}", "analysis": "skipped (--plan)",
                                         "backend": backend.name, "pinned": {k: v[0].name for k, v in pinned.items()}}
        return plan

    def _pinned(self, names: list[str]) -> dict[str, tuple[Candidate, str]]:
        """Layers whose candidate is fixed: ``exclude`` (fp32), then ``overrides`` (last wins)."""
        out: dict[str, tuple[Candidate, str]] = {}
        for name in names:
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                out[name] = (Candidate("fp32"), "excluded by the recipe")
        for item in self.overrides:
            pattern, sep, spec = item.partition("=")
            if not sep:
                raise InputError(f"--override {item!r}: expected LAYER_GLOB=PRECISION")
            cand = Candidate.parse(spec)
            if cand.weight_bits == 4 and cand.group_size is None:
                cand = Candidate(cand.precision, 128)  # as the 4-bit recipes; "-g32" picks another group
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern.strip())]
            if not hits:
                raise InputError(f"--override {item!r}: no layer matches {pattern.strip()!r}")
            for n in hits:
                out[n] = (cand, f"override {item}")
        return out

    def _offered(self, backend) -> tuple[list[Candidate], dict[str, str]]:
        """The candidates ``backend`` runs, and why each other one is dropped."""
        offered, dropped = [], {}
        for c in self._candidates:
            why = backend.supports(self._layer_plan(c))
            if why is None:
                offered.append(c)
            else:
                dropped[c.name] = why
        return offered, dropped

    def _backend_notes(self, backend, timed: bool, dropped: dict[str, str]) -> dict[str, Any]:
        """Whose costs the plan was solved with, and which candidates the backend does not run."""
        costs = f"bytes of each candidate as {backend.lowering} stores it"
        if timed:
            costs += f"; latency of that lowered linear timed by ONNX Runtime at T={self.latency_seq_len}"
        elif self.measure_latency:
            costs += f"; no latency: the {backend.name} kernels are not timed by the planner"
        sens = "each candidate lowered by lower-ort, run in ONNX Runtime"
        if backend.lowering != "lower-ort":
            sens += f" (the numbers {backend.lowering} computes for the same plan)"
        return {"name": backend.name, "costs": costs, "sensitivity": sens, "dropped": dropped}

    # ------------------------------------------------------------------
    def _analyse(self, model: ir.Model, linears, rejected) -> Plan:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        batches_all = self.context.calibration_batches
        if not batches_all:
            raise InputError("plan-mixed measures sensitivities on calibration data, and the compile has none")
        backend = get_backend(self.context.backend)
        offered, dropped = self._offered(backend)
        timed = self.measure_latency and backend.measures_latency
        if self._latency is not None and not timed:
            raise InputError(f"--budget-latency: the planner times only kernels that run in ONNX Runtime, not the "
                             f"{backend.name} backend's; give a size budget (--budget) or an accuracy target")
        names = [lin.name for lin in linears]
        pinned = self._pinned(names)
        for name, (cand, why) in pinned.items():
            refused = backend.supports(self._layer_plan(cand))
            if refused is not None:
                raise InputError(f"layer {name} pinned to {cand.name} ({why}): --backend {backend.name} cannot run it: "
                                 f"{refused}")
        cands = list(offered)
        for cand, _ in pinned.values():
            if cand not in cands:
                cands.append(cand)
        cnames = [c.name for c in cands]
        L, C = len(linears), len(cands)
        allowed = np.ones((L, C), bool)
        for i, lin in enumerate(linears):
            if lin.name in pinned:
                allowed[i] = [c == pinned[lin.name][0] for c in cands]
            else:
                allowed[i] = [c in offered for c in cands]

        # -- costs ------------------------------------------------------
        table = costs_mod.CostTable(self.cost_table or costs_mod.default_cost_table(), threads=self.threads,
                                    opset_imports=dict(model.graph.opset_imports), backend=backend)
        shapes = [lin.shape for lin in linears]
        cost = costs_mod.layer_costs(table, shapes, cands, self.latency_seq_len, latency=timed)
        table.save()
        nbytes = np.array([[cost[(s, c)]["bytes"] for c in cnames] for s in shapes], float)
        weights = np.array([s[0] * s[1] for s in shapes], float)
        total_weights = float(weights.sum())
        ms = (np.array([[cost[(s, c)]["ms"] for c in cnames] for s in shapes], float) if timed else None)
        timings["costs"] = time.perf_counter() - t0

        # -- sensitivities -------------------------------------------------
        t1 = time.perf_counter()
        batches = batched(batches_all[: self.samples], self.max_tokens)
        ids = None
        if getattr(self.context.adapter, "task", None) == "causal-lm" and all("input_ids" in b for b in batches):
            ids = [b["input_ids"] for b in batches]
        # entries are per (layer, candidate): the candidate list is not part of the key, so another
        # list (or an override to a candidate outside it) reuses what was measured
        key_extra = {
            "algorithms": [self.weight_algorithm_8bit, self.weight_algorithm_4bit, self.act_order],
            "samples": self.samples, "max_tokens": self.max_tokens, "version": sens_mod.CACHE_VERSION,
            "ort": costs_mod.ort.__version__, "metric": "kl" if ids is not None else "1-cosine",
        }
        key = sens_mod.fingerprint(model, batches_all, key_extra)
        cache = sens_mod.SensitivityCache(sens_mod.default_cache_dir() if self.cache else None, key)
        pairs = [(lin.name, cnames[j]) for i, lin in enumerate(linears) for j in range(C) if allowed[i, j]]
        # the session is built even when every sensitivity is cached: the chosen plan is measured in it
        hessians = {}
        if any(self._layer_plan(c).weight_algorithm == "gptq" for c in cands if c.weight_bits):
            th = time.perf_counter()
            hessians = gptq.collect_hessians(model, {lin.x.name: lin.shape[0] for lin in linears}, batches_all,
                                             show_progress=self.context.progress)
            timings["hessians"] = time.perf_counter() - th
        tb = time.perf_counter()
        local = (sens_mod.layer_inputs(model, [lin.x.name for lin in linears], batches, threads=self.threads)
                 if self.sensitivity == "scaled" else None)
        graph = sens_mod.SensitivityGraph(
            model, cands, layer_plan=lambda c, layer: self._layer_plan(c), stats=self.context.stats,
            hessians=hessians, threads=self.threads, local_inputs=local, show_progress=self.context.progress,
        )
        del hessians, local
        timings["build_graph"] = time.perf_counter() - tb
        tr = time.perf_counter()
        scorer = sens_mod.Scorer(sens_mod.reference_outputs(graph, batches), ids)
        timings["reference_run"] = time.perf_counter() - tr
        how = sens_mod.measure_scaled if self.sensitivity == "scaled" else sens_mod.measure
        values, record = how(graph, batches, scorer, pairs, cache=cache, show_progress=self.context.progress)
        timings["sensitivity_runs"] = record["seconds"]
        S = np.zeros((L, C))
        D = np.zeros((L, C))
        for i, lin in enumerate(linears):
            for j, c in enumerate(cnames):
                v = values.get((lin.name, c))
                if v is not None:
                    S[i, j] = max(v["metric"], 0.0)  # a KL below fp32's is noise, not a gain
                    D[i, j] = v.get("dnll", 0.0)
        timings["analysis"] = time.perf_counter() - t1

        # -- constraints ---------------------------------------------------
        fixed_bytes = self._fixed_bytes(model, linears)
        constraints: list[allocate.Constraint] = []
        latency_info: dict[str, Any] = {}
        bits = nbytes * 8.0 / total_weights
        if self._size is not None and self._size.kind == "bits":
            constraints.append(allocate.Constraint("budget", bits, self._size.value,
                                                   show=lambda v: f"{v:.4g} bits per linear weight"))
        elif self._size is not None:
            constraints.append(allocate.Constraint("budget", nbytes, self._size.value - fixed_bytes,
                                                   show=lambda v, f=fixed_bytes: f"{v + f:,.0f} bytes ({(v + f) / 1e6:.3f} MB)"))
        if self._latency is not None:
            fp32_ms, other = self._model_latency(model)
            j32 = cnames.index("fp32")
            # the micro-benchmarks (perhaps from another day's cost table, or another load) are put on the
            # scale of this model here and now: its linears, all fp32, take fp32_ms - other
            micro = float(ms[:, j32].sum())
            scale = (fp32_ms - other) / micro if micro > 0 else 1.0
            ms = ms * scale
            latency_info = {"fp32_model_ms": fp32_ms, "fp32_linears_ms": fp32_ms - other, "other_ms": other,
                            "micro_benchmark_scale": scale, "seq_len": self.latency_seq_len, "threads": self.threads}
            constraints.append(allocate.Constraint(
                "latency budget", ms, self._latency * fp32_ms - other,
                show=lambda v, o=other, f=fp32_ms: f"{(v + o) / f:.3f}x of fp32 ({v + o:.2f} ms at T={self.latency_seq_len})"))
        mode = "budget"
        if self.max_kl or self._ppl is not None:
            mode = "target"
            if self.max_kl:
                target = allocate.Constraint("--max-kl", S, self.max_kl, show=lambda v: f"KL {v:.4g}")
            else:
                if ids is None:
                    raise InputError("--max-ppl-increase needs a language model (token ids); use --max-kl")
                # a layer whose quantization seems to lower the NLL is noise, not a credit to spend
                target = allocate.Constraint("--max-ppl-increase", np.maximum(D, 0.0), math.log1p(self._ppl),
                                             show=lambda v: f"{math.expm1(v):.3%}")
            constraints = [target]
        elif not constraints:
            self._size = allocate.parse_budget("5.0bits")
            constraints.append(allocate.Constraint("budget", bits, 5.0, show=lambda v: f"{v:.4g} bits per linear weight"))

        # -- solve ---------------------------------------------------------
        ts = time.perf_counter()
        objective = nbytes if mode == "target" else S
        choice = allocate.solve(objective, allowed, constraints, time_limit=self.time_limit)
        timings["solve"] = time.perf_counter() - ts
        tm = time.perf_counter()
        joint = scorer.score(graph.run(batches, choice.astype(np.int64)))
        timings["joint_measure"] = time.perf_counter() - tm

        # -- the Pareto curve: more budgets, predicted and measured --------
        tp = time.perf_counter()
        pareto = self._pareto(graph, scorer, batches, S, D, bits, nbytes, ms, allowed, fixed_bytes, latency_info, cnames)
        timings["pareto"] = time.perf_counter() - tp

        # -- the plan ---------------------------------------------------------
        plan = Plan(skipped=dict(rejected))
        how = "; ".join(f"{c.name} {c.show(c.limit) if callable(c.show) else c.limit}" for c in constraints)
        for i, lin in enumerate(linears):
            j = int(choice[i])
            cand = cands[j]
            why = pinned[lin.name][1] if lin.name in pinned else f"mixed: least predicted error under {how}"
            lp = self._layer_plan(cand, why)
            lp.sensitivity = {"kl" if ids is not None else "1-cosine": float(S[i, j])} | (
                {"dnll": float(D[i, j])} if ids is not None else {})
            lp.cost = {"bytes": int(nbytes[i, j]), "bits_per_weight": float(nbytes[i, j] * 8 / weights[i])} | (
                {"latency_ms": float(ms[i, j]), "seq_len": self.latency_seq_len} if ms is not None else {})
            plan.layers[lin.name] = lp
        timings["total"] = time.perf_counter() - t0
        predicted_kl = allocate.total(S, choice)
        achieved = {
            "bits_per_weight": allocate.total(bits, choice),
            "linear_bytes": allocate.total(nbytes, choice),
            "weight_bytes": allocate.total(nbytes, choice) + fixed_bytes,
        }
        if ms is not None:
            achieved["linears_ms"] = allocate.total(ms, choice)
            if latency_info:
                achieved["predicted_model_ms"] = achieved["linears_ms"] + latency_info["other_ms"]
                achieved["predicted_latency_ratio"] = achieved["predicted_model_ms"] / latency_info["fp32_model_ms"]
        self.context.notes[NOTES_KEY] = {
            "mode": mode,
            "budget": {"size": self.budget or (self._size.text if self._size else None),
                       "latency": self.budget_latency or None, "max_kl": self.max_kl or None,
                       "max_ppl_increase": self._ppl},
            "constraints": [{"name": c.name, "limit": c.limit, "text": c.show(c.limit) if callable(c.show) else None}
                            for c in constraints],
            "bits_definition": "stored bytes of each lowered linear (codes, scales, zero points) x 8 / its weights",
            "achieved": achieved,
            "fixed_bytes": fixed_bytes,
            "metric": "kl" if ids is not None else "1-cosine",
            "predicted": {"metric": predicted_kl, "dnll": allocate.total(D, choice) if ids is not None else None},
            "measured_calibration": joint,
            "latency": latency_info,
            "candidates": cnames,
            "backend": self._backend_notes(backend, timed, dropped),
            "counts": {c: int((choice == j).sum()) for j, c in enumerate(cnames) if (choice == j).any()},
            "pinned": {k: v[0].name for k, v in pinned.items()},
            "table": {lin.name: {c: {"metric": float(S[i, j]), "dnll": float(D[i, j]), "bytes": int(nbytes[i, j]),
                                     **({"ms": float(ms[i, j])} if ms is not None else {})}
                                 for j, c in enumerate(cnames) if allowed[i, j]}
                      for i, lin in enumerate(linears)},
            "pareto": pareto,
            "samples": len(batches_all[: self.samples]),
            "tokens": int(sum(max(np.asarray(v).size for v in b.values()) for b in batches)),
            "sensitivity": {**record, "layers": L, "candidates": C, "cache": str(cache.path) if cache.path else None},
            "cost_table": {"path": str(table.path) if table.path else None, "measured": table.measured,
                           "reused": table.reused, "device": table.device, "remeasured": table.remeasured},
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        return plan

    # ------------------------------------------------------------------
    def _pareto(self, graph, scorer, batches, S, D, bits, nbytes, ms, allowed, fixed_bytes, latency_info, cnames):
        """Plans at ``pareto_points`` size budgets (bits per weight) from the cheapest plan up: predicted and
        measured error of each."""
        if self.pareto_points <= 0:
            return []
        points = []
        lo = allocate.minimum_total(bits, allowed)
        hi = float(np.where(allowed, bits, -np.inf).max(axis=1).sum())
        hi = min(hi, max(lo * 2.0, 8.5))  # past ~8 bits every layer is near lossless: the curve is flat
        for limit in np.linspace(lo, hi, self.pareto_points):
            con = allocate.Constraint("budget", bits, float(limit) * (1 + 1e-9))
            try:
                choice = allocate.solve(S, allowed, [con], time_limit=self.time_limit)
            except InputError:
                continue
            measured = scorer.score(graph.run(batches, choice.astype(np.int64)))
            row = {
                "bits_per_weight": allocate.total(bits, choice),
                "weight_bytes": allocate.total(nbytes, choice) + fixed_bytes,
                "predicted": allocate.total(S, choice),
                "predicted_dnll": allocate.total(D, choice),
                "measured": measured["metric"],
                "measured_dnll": measured.get("dnll"),
                "counts": {c: int((choice == j).sum()) for j, c in enumerate(cnames) if (choice == j).any()},
            }
            if ms is not None:
                row["linears_ms"] = allocate.total(ms, choice)
            points.append(row)
        return points

    def _fixed_bytes(self, model: ir.Model, linears) -> int:
        """Bytes of every weight that is not a planned linear's, as the artifact will store them."""
        linear_weights = {id(lin.weight) for lin in linears}
        tables = {}
        if self.quantized_embeddings:
            rule = QuantizeEmbeddingsPass()
            for node in model.graph:
                if node.op_type == "Gather" and node.domain == "" and rule._reason(node, node.inputs[0]) is None:
                    v, d = node.inputs[0].const_value.shape
                    tables[id(node.inputs[0])] = int(v) * int(d) + 4 * int(v)  # int8 rows + a float scale each
        total = 0
        for v in model.graph.initializers.values():
            if v.const_value is None or id(v) in linear_weights:
                continue
            total += tables.get(id(v), v.const_value.nbytes)
        return int(total)

    def _model_latency(self, model: ir.Model) -> tuple[float, float]:
        """Median ms at ``latency_seq_len`` tokens of the fp32 model as it stands, and of the same model with
        every linear replaced by a broadcast of its output shape (what is not the linears), interleaved."""
        adapter = self.context.adapter
        if getattr(adapter, "task", None) in ("causal-lm", "encoder"):
            feed = adapter.make_inputs([[1 + (i % 100) for i in range(self.latency_seq_len)]])
        else:
            feed = self.context.calibration_batches[0]
        stub = ir.from_proto(ir.to_proto(model))
        for lin in find_linears(stub.graph)[0]:
            n = lin.shape[1]
            first = add_initializer(stub.graph, f"{lin.name}#stub_first", np.array([0], np.int64))
            one = add_initializer(stub.graph, f"{lin.name}#stub_one", np.array([1], np.int64))
            axis = add_initializer(stub.graph, f"{lin.name}#stub_axis", np.array([-1], np.int64))
            zeros = add_initializer(stub.graph, f"{lin.name}#stub_zeros", np.zeros(n, np.float32))
            col = ir.node("Slice", [lin.x, first, one, axis], name=f"{lin.name}#stub_slice")
            out = ir.node("Mul", [col.outputs[0], zeros], name=f"{lin.name}#stub")
            stub.graph.insert_before(lin.node, [col, out])
            replace_value(lin.node.outputs[0], out.outputs[0])
            stub.graph.remove(lin.node, safe=True)
        sessions = [session_for(m, threads=self.threads) for m in (model, stub)]
        feeds = [{k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
        times: list[list[float]] = [[], []]
        for _ in range(3):  # interleaved: a change of load hits both
            for i, (s, f) in enumerate(zip(sessions, feeds)):
                times[i].append(_median_ms(s, f))
        full, other = (float(np.median(t)) for t in times)
        return full, min(other, full)
