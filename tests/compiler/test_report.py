"""``lowbit report``: one self-contained HTML page that opens in a headless browser and shows plots."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from lowbit.compiler.cli import main
from lowbit.compiler.report import _Figures, _pareto, bits_of, write_report
from tests.compiler.stories_w8a8 import compiled, explained

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def artifact(shared_dir, tmp_path_factory):
    return compiled(shared_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def report(artifact, tmp_path_factory):
    explained(artifact)  # stored in the artifact, where the command reads it
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(artifact), "-o", str(out)]) == 0
    return out


def test_bits_of_precisions():
    assert bits_of("w8a8") == (8, 8) and bits_of("w8a16") == (8, 32) and bits_of("fp32") == (32, 32)
    assert bits_of("w4a16") == (4, 32) and bits_of("w4a8") == (4, 8)  # "a16": float activations, run in fp32
    assert bits_of("w2a6") == (2, 6) and bits_of("fp16") == (16, 16)  # names the plan does not know yet


def test_report_is_self_contained_with_all_sections(report):
    text = report.read_text()
    images = re.findall(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 3  # bit allocation, SQNR + contribution, per-channel activation ranges
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<script" not in text  # nothing to fetch, nothing to run
    for heading in ("Accuracy and speed vs fp32", "Bit allocation", "Where the error comes from", "Pass-by-pass bisect",
                    "Suggested promotions", "Activation ranges", "Passes", "Layers"):
        assert f">{heading}<" in text, heading
    assert "--override &quot;model.layers." in text and "KL(fp32 ‖ quantized)" in text


def test_pareto_curve_when_the_manifest_has_one():
    figs = _Figures()
    assert _pareto(figs, {}) == ""
    points = [{"bits_per_weight": b, "kl": 0.1 / b, "chosen": b == 6} for b in (4, 5, 6, 8)]
    for pareto in (points, {"points": points}):
        assert _pareto(figs, {"pareto": pareto}).startswith('<img alt="plot" src="data:image/png;base64,')
    assert "not in a form this report can plot" in _pareto(figs, {"pareto": [{"what": "x"}]})


def test_report_without_explain_results_shows_the_calibrated_ranges(artifact, tmp_path):
    out = write_report(artifact, tmp_path / "plain.html", explain=None)
    text = out.read_text()
    assert "run <code>lowbit explain</code>" in text and "Where the error comes from" not in text
    assert text.count("data:image/png;base64,") == 2  # bit allocation, calibrated ranges


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium chromium-driver)")
def test_report_opens_in_headless_chromium_and_shows_plots(report, tmp_path):
    """Done-when (c): no console errors, and the screenshot is not blank."""
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           "--enable-logging=stderr", "--v=0", report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1200)
    non_white = (img < 0.95).any(axis=-1).mean()
    colors = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert non_white > 0.05 and colors > 200, (non_white, colors)
    # the plot colours are on screen, not only text: matplotlib's default blue and orange lines/bars
    blue = (np.abs(img - np.array([0.12, 0.47, 0.71])) < 0.06).all(axis=-1).mean()
    assert blue > 0.001, blue


def test_report_runs_explain_only_when_asked(artifact, tmp_path, monkeypatch, capsys):
    import lowbit.compiler.cli as cli
    import lowbit.compiler.explain as explain_mod

    calls = []
    monkeypatch.setattr(explain_mod, "load_explain", lambda folder: None)  # as if explain never ran
    monkeypatch.setattr(cli, "_run_explain", lambda args: calls.append(args) or None)
    assert main(["report", str(artifact), "-o", str(tmp_path / "a.html")]) == 0
    err = capsys.readouterr().err
    assert calls == [] and "add --explain" in err and "roughly" in err  # says what it would cost
    assert "run <code>lowbit explain</code>" in (tmp_path / "a.html").read_text()
    assert main(["report", str(artifact), "-o", str(tmp_path / "b.html"), "--explain"]) == 0
    err = capsys.readouterr().err
    assert len(calls) == 1 and "running 'lowbit explain' first" in err and "roughly" in err
    assert main(["-q", "report", str(artifact), "-o", str(tmp_path / "c.html")]) == 0
    assert capsys.readouterr().err == "" and len(calls) == 1


def test_report_shows_both_greedy_texts(artifact, tmp_path):
    text = write_report(artifact, tmp_path / "g.html").read_text()
    assert "greedy text after &#x27;Once upon a time&#x27;" in text and "tokens as fp32" in text
    assert "fp32&#x27;s text" in text and "artifact&#x27;s text" in text
