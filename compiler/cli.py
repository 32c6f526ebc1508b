"""The ``lowbit`` command line: compile, run, inspect, diff, explain, report, passes.

Errors a user can fix print one line naming the cause and exit with status 2;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from lowbit.compiler.core.errors import LowbitError


def _percent(text: str) -> float:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a percentage, got {text!r}") from None


def _setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PASS.OPTION=VALUE, got {text!r}")
    try:
        import tomllib

        value = tomllib.loads(f"v = {raw}")["v"]
    except Exception:
        value = raw  # a bare word is a string
    return key.strip(), value


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``lowbit: error:`` line like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"lowbit: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Quantization compiler for transformer models.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every step; tracebacks on errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars, only the result")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact folder")
    c.add_argument("model", help=".onnx file, Hugging Face checkpoint folder, or llama2.c .bin")
    c.add_argument("-o", "--output", required=True, help="artifact folder (written atomically)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an artifact already in the output folder (else the compile refuses, before any work)")
    c.add_argument("--recipe", default="w8a8", help="built-in recipe name or recipe .toml file (default w8a8)")
    c.add_argument("--calib-data", help="UTF-8 text file for calibration (default: built-in text)")
    c.add_argument("--eval-data", help="UTF-8 text file for evaluation (default: held-out part of the calibration text)")
    c.add_argument("--tokenizer", help="tokenizer file or folder, when the model has none beside it")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass (NNN_<Pass>.onnx + .txt)")
    c.add_argument("--override", action="append", default=[], metavar="GLOB=PRECISION",
                   help="pin layers, e.g. 'model.layers.*.mlp.down_proj=fp32' (repeatable)")
    c.add_argument("--set", action="append", default=[], type=_setting, metavar="PASS.OPTION=VALUE",
                   help="change a recipe option, e.g. plan.activations=static (repeatable)")
    c.add_argument("--max-drop", type=_percent, help="fail if perplexity rises (or cosine falls) by more, e.g. 1%%")
    c.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for evaluation and timing (default 2)")
    # the mixed-precision planner (recipe "mixed"); each flag sets a plan-mixed option
    c.add_argument("--budget", help="recipe mixed: size budget, e.g. 5.0bits (average bits per linear weight, scales "
                                    "included) or 60MB (bytes of the artifact's weights)")
    c.add_argument("--budget-latency", metavar="FRACTION",
                   help="recipe mixed: latency budget, a fraction of the fp32 model's at 128 tokens, e.g. 0.5x")
    c.add_argument("--max-kl", type=float, help="recipe mixed: the smallest plan whose predicted KL from fp32 is at most this")
    c.add_argument("--max-ppl-increase", metavar="PERCENT",
                   help="recipe mixed: the smallest plan whose predicted perplexity increase is at most this, e.g. 2%%")
    c.add_argument("--plan", metavar="PLAN_JSON",
                   help="recipe mixed: use this plan (an artifact's manifest.json or a plan JSON) instead of analysing")
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    c.add_argument("--backend", default="onnxruntime", metavar="NAME",
                   help="onnxruntime (or ort: model.onnx, default), tvm (lib.so + params.bin, run with the TVM "
                        "runtime), or another installed backend (group lowbit.backends)")
    c.add_argument("--target", default="llvm", help="--backend tvm: llvm (this CPU, default) or cuda")
    c.add_argument("--arch", help="--backend tvm --target cuda: GPU architecture, e.g. sm_80, sm_90 (default sm_80)")
    c.add_argument("--tune", type=int, default=0, metavar="N",
                   help="--backend tvm --target llvm: MetaSchedule trials per quantized matmul, tuned at the "
                        "--tune-seq-len lengths (default 0: dlight's schedules)")
    c.add_argument("--tune-seq-len", type=int, nargs="+", metavar="L",
                   help="--tune: sequence lengths (batch 1) to tune and build specialised entries for (default 1 128)")
    c.add_argument("--tuning-db", metavar="DIR",
                   help="--tune: MetaSchedule database folder to reuse and extend (or an earlier TVM artifact); "
                        "kernels it has records for are not tuned again")
    c.add_argument("--keep-reference", action="store_true",
                   help="also keep the imported fp32 graph (reference.onnx) so 'lowbit explain' need not export again")

    r = sub.add_parser("run", help="run an artifact: generate text, or run inputs from an .npz")
    r.add_argument("artifact")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text to continue (language models)")
    g.add_argument("--inputs", help=".npz file of input arrays by input name")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--output", help="with --inputs: write outputs to this .npz")
    r.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: ORT's choice)")
    r.add_argument("--truncate", action="store_true",
                   help="with --prompt: keep the prompt's last tokens when prompt + --max-new-tokens exceeds the "
                        "model's context (else refused)")
    r.add_argument("--no-verify", action="store_true",
                   help="do not check the artifact's files against the sha256 in manifest.json (a mismatch is refused)")

    i = sub.add_parser("inspect", help="show an artifact's manifest as tables")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the manifest JSON")
    i.add_argument("--no-verify", action="store_true",
                   help="do not check the artifact's files against the sha256 in manifest.json (a mismatch is a warning)")
    i.add_argument("--layers", action="store_true",
                   help="one row per linear: precision, granularity, transforms, input ranges, measured error")
    i.add_argument("--errors", action="store_true", help="measure where the error comes from (same as 'lowbit explain')")
    _explain_options(i)

    d = sub.add_parser("diff", help="what changed between two IRs: dumps, .onnx files or artifacts",
                       description="lowbit diff A B (two .onnx files or artifact folders), lowbit diff DUMPDIR I J "
                                   "(two stages of one --dump-ir folder), or lowbit diff DUMPDIR (what every pass did)")
    d.add_argument("paths", nargs="+", metavar="A|DUMPDIR")
    d.add_argument("--json", action="store_true", help="print the differences as JSON")
    d.add_argument("--limit", type=int, default=40, help="rows shown per kind of change (default 40; --json has all)")

    e = sub.add_parser("explain", help="per-layer error, pass-by-pass bisect, and promotions that would fix it")
    e.add_argument("artifact")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    _explain_options(e)

    rp = sub.add_parser("report", help="write a self-contained HTML report of an artifact")
    rp.add_argument("artifact")
    rp.add_argument("-o", "--output", help="HTML file (default: ARTIFACT/report.html)")
    rp.add_argument("--explain", action="store_true",
                    help="run 'lowbit explain' first when its results are missing (per-layer SQNR plots and "
                         "suggestions); it replays the compile and measures promotions: several times the compile's "
                         "time (about 25 min for SmolLM2-135M on 2 cores)")
    rp.add_argument("--no-explain", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    _explain_options(rp)

    sub.add_parser("passes", help="list registered passes and their options")
    return parser


def _explain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="the model compiled, when the artifact keeps no reference.onnx and the manifest's source moved")
    p.add_argument("--samples", type=int, help="held-out samples to measure on (default: all the compile used)")
    p.add_argument("--candidates", type=int, default=12,
                   help="measure the promotion of this many layers, those with the most local error, plus any layer "
                        "writing a model output (default 12; 0: every layer)")
    p.add_argument("--measure", action="append", default=[], metavar="GLOB",
                   help="also measure the promotion of these layers (repeatable)")
    p.add_argument("--suggest", type=int, default=3, help="promotions to suggest (default 3)")


def _run_explain(args):
    from lowbit.compiler.explain import explain

    return explain(args.artifact, source=args.source, samples=args.samples, candidates=args.candidates,
                   measure=args.measure, suggestions=args.suggest, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from lowbit.compiler.core.progress import on_terminal, set_quiet

    if not args.verbose:
        # third parties' bars (the GGUF conversion's) only on a terminal: in a log they are pages of \r updates
        _quiet_third_parties(progress_bars=not args.quiet and on_terminal())

    set_quiet(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except LowbitError as e:
        if args.verbose:
            traceback.print_exc()
        one_line = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # a library's may span many
        print(f"lowbit: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130


def _quiet_third_parties(*, progress_bars: bool) -> None:
    """Keep torch's exporter and transformers from flooding the terminal (``--verbose`` shows all)."""
    import os
    import warnings

    for name in ("torch", "torch.onnx", "torch._dynamo", "torch.export", "transformers", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_LOGS", "-all")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not progress_bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


def cmd_compile(args) -> int:
    from lowbit.compiler.core.progress import say

    say(f"compile {args.model} into {args.output} (loading torch and ONNX first: a few seconds)")
    from lowbit.compiler.driver import compile

    result = compile(
        args.model,
        args.output,
        recipe=args.recipe,
        calib_data=args.calib_data,
        eval_data=args.eval_data,
        tokenizer=args.tokenizer,
        dump_ir=args.dump_ir,
        overrides=args.override,
        settings=dict(args.set) | _mixed_settings(args),
        max_drop=args.max_drop,
        threads=args.threads,
        measure_latency=not args.no_latency,
        progress=not args.quiet,
        keep_reference=args.keep_reference,
        overwrite=args.overwrite,
        **_backend_options(args),
    )
    print((result.path / "summary.txt").read_text(), end="")
    if not args.quiet:
        print(f"artifact: {result.path}")
    return 0


def _mixed_settings(args) -> dict[str, Any]:
    """The mixed-precision flags as ``plan-mixed`` options."""
    flags = {"budget": args.budget, "budget_latency": args.budget_latency, "max_kl": args.max_kl,
             "max_ppl_increase": args.max_ppl_increase, "plan_file": args.plan}
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        from lowbit.compiler.core.errors import InputError
        from lowbit.compiler.core.recipe import load_recipe

        if not any(p.name == "plan-mixed" for p in load_recipe(args.recipe).passes):
            names = ", ".join("--" + ("plan" if k == "plan_file" else k.replace("_", "-")) for k in given)
            verb = "needs" if len(given) == 1 else "need"
            raise InputError(f"{names} {verb} a recipe with a plan-mixed pass (--recipe mixed); recipe {args.recipe!r} has none")
    return {f"plan-mixed.{k}": v for k, v in given.items()}


def _backend_options(args) -> dict[str, Any]:
    """The backend and its flags; the backend object says which flags it takes (``Backend.check``)."""
    return {"backend": args.backend, "target": args.target, "arch": args.arch, "tune": args.tune,
            "tune_seq_lens": args.tune_seq_len, "tuning_db": args.tuning_db}


def cmd_run(args) -> int:
    from lowbit.compiler.core.artifact import load_manifest
    from lowbit.compiler.core.backend import get_backend

    if args.truncate and args.prompt is None:
        from lowbit.compiler.core.errors import InputError

        raise InputError("--truncate applies to --prompt (an --inputs array longer than the context is refused)")
    backend = get_backend(load_manifest(args.artifact).get("backend"))
    art = backend.load(args.artifact, threads=args.threads or None, verify=not args.no_verify)
    if args.prompt is not None:
        print(art.generate(args.prompt, max_new_tokens=args.max_new_tokens, truncate=args.truncate, notify=_note))
        return 0
    import numpy as np

    outputs = art.run_npz(args.inputs)
    if args.output:
        np.savez(args.output, **outputs)
    for name, arr in outputs.items():
        print(f"{name}: shape {list(arr.shape)} dtype {arr.dtype}\n{arr}")
    return 0


def cmd_inspect(args) -> int:
    from lowbit.compiler.core.artifact import load_manifest
    from lowbit.compiler.inspect import render

    manifest = load_manifest(args.artifact)
    verified = _inspect_verify(args, manifest)
    if args.errors:
        return cmd_explain(args)
    if args.layers:
        from lowbit.compiler.explain import load_explain
        from lowbit.compiler.inspect import layer_rows, render_layers

        measured = load_explain(args.artifact)
        if args.json:
            print(json.dumps(layer_rows(manifest, measured), indent=2))
        else:
            render_layers(manifest, measured)
        return 0
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        render(manifest, verified=verified)
    return 0


def _note(text: str) -> None:
    print(f"lowbit: note: {text}", file=sys.stderr)


def _inspect_verify(args, manifest: dict[str, Any]) -> str:
    """``lowbit inspect`` checks every file the manifest lists (a problem is a warning on stderr, not an
    error: inspect only reads the manifest); what it found, for the table's last line. Files the
    manifest does not list are not its concern here (``explain.json``, ``report.html`` come later)."""
    if args.no_verify:
        return "not verified (--no-verify)"
    from lowbit.compiler.core.artifact import file_problems

    listed = manifest.get("files") or {}
    problems = file_problems(args.artifact, manifest, select=lambda name: name in listed)
    for problem in problems:
        print(f"lowbit: warning: {problem}", file=sys.stderr)
    if problems:
        return f"{len(problems)} problem(s) against manifest.json's sha256 (see the warnings; 'lowbit run' refuses it)"
    return f"all {len(manifest.get('files') or {})} verified against manifest.json's sha256"


def cmd_diff(args) -> int:
    from pathlib import Path as _Path

    from lowbit.compiler import diff

    if len(args.paths) == 1 and _Path(args.paths[0]).is_dir() and not (_Path(args.paths[0]) / "model.onnx").exists():
        rows = diff.diff_dump_folder(args.paths[0])
        print(diff.to_json(rows)) if args.json else diff.render_stages(rows)
        return 0
    result = diff.diff_paths(args.paths)
    print(diff.to_json(result)) if args.json else diff.render(result, limit=args.limit)
    return 0


def cmd_explain(args) -> int:
    from lowbit.compiler.explain import _finite, render

    result = _run_explain(args)
    if args.json:
        print(json.dumps(_finite(result), indent=2))
    else:
        render(result)
        print(f"results saved in {Path(args.artifact) / 'explain.json'} (read by 'lowbit inspect --layers' and 'lowbit report')")
    return 0


def cmd_report(args) -> int:
    from lowbit.compiler.explain import load_explain
    from lowbit.compiler.report import explain_estimate, write_report

    measured = load_explain(args.artifact)
    if measured is None and args.explain and not args.no_explain:
        if not args.quiet:
            print(f"lowbit: note: running 'lowbit explain' first (per-layer error for the plots): "
                  f"{explain_estimate(args.artifact)}", file=sys.stderr)
        measured = _run_explain(args)
    elif measured is None and not args.quiet:
        print(f"lowbit: note: no 'lowbit explain' results in {args.artifact}: the report has no per-layer error plots "
              f"(add --explain to measure them first: {explain_estimate(args.artifact)})", file=sys.stderr)
    out = write_report(args.artifact, args.output, explain=measured)
    print(f"report: {out}")
    return 0


def cmd_passes(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from lowbit.compiler.core.registry import all_passes, pass_options

    table = Table(title="lowbit passes", show_lines=True)
    for col in ("name", "class", "what it does", "options"):
        table.add_column(col)
    for name, cls in sorted(all_passes().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        opts = "\n".join(f"{o.name}: {o.type} = {o.default!r}" + (f" — {o.help}" if o.help else "") for o in pass_options(cls))
        table.add_row(name, f"{cls.__module__}.{cls.__qualname__}", escape(doc[0]) if doc else "", escape(opts))  # list[str]: not markup
    Console().print(table)
    return 0


COMMANDS = {
    "compile": cmd_compile,
    "run": cmd_run,
    "inspect": cmd_inspect,
    "diff": cmd_diff,
    "explain": cmd_explain,
    "report": cmd_report,
    "passes": cmd_passes,
}

if __name__ == "__main__":
    raise SystemExit(main())
