"""The HTML report of a real tiny search, rendered in headless Chromium: every plot exists and draws,
no console errors, no network requests; the CSV beside it matches the database; bad input is clear."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from tests.browser import browser_page
from tests.test_search_e2e import _config, _run
from yoloprune.config import load_config

pytestmark = pytest.mark.slow

PLOTS = ["front-latency", "front-gflops", "latency-vs-flops", "front-ratios", "progress", "hypervolume", "per-class"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """Config of a finished 4-trial search (one of them the uniform baseline) with a latency target."""
    tmp = tmp_path_factory.mktemp("report")
    cfg_path = _config(tmp, tiny_data, "report", budget={"trials": 4})
    proc = _run("search", str(cfg_path), "--no-progress", "--uniform", "0.3", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cfg_path


def test_report_renders_in_chromium_offline_without_errors(searched: Path, tmp_path: Path):
    out = tmp_path / "r" / "report.html"
    proc = _run("report", str(searched), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.is_file() and "7 plots" in proc.stdout  # no importances: 4 trials are too few
    page_text = out.read_text()
    assert "<dt>Hypervolume</dt>" in page_text and "for map50_95: n/a (fewer than 10 complete trials" in page_text
    requests: list[str] = []
    with browser_page(1300, 900) as (page, errors):
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri(), wait_until="load")
        for plot in PLOTS:
            page.locator(f"#{plot} .main-svg").first.wait_for(timeout=30_000)
        drawn = page.evaluate(
            """ids => ids.map(id => {
                const el = document.getElementById(id);
                return {id, traces: el && el.data ? el.data.length : 0,
                        marks: el ? el.querySelectorAll('.point, .bars path, .parcoords .y-axis, path.js-line').length : 0};
            })""",
            PLOTS,
        )
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert not errors, errors
    assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    for plot in drawn:
        assert plot["traces"] >= 1 and plot["marks"] >= 1, drawn
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_report_csv_matches_the_database(searched: Path, tmp_path: Path):
    assert _run("report", str(searched), "--trial", "1", cwd=tmp_path).returncode == 0
    cfg = load_config(searched)
    csv = pd.read_csv(cfg.output_dir / "trials.csv")
    trials = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()
    assert list(csv["trial"]) == [t.number for t in trials]
    assert list(csv["state"]) == [t.state.name.lower() for t in trials]
    for t, (_, row) in zip(trials, csv.iterrows(), strict=True):
        if t.state != TrialState.COMPLETE:
            continue
        m = t.user_attrs["metrics"]
        for key in ("map50_95", "gflops", "flops_reduction", "latency_ms.cpu"):
            assert row[key] == pytest.approx(m[key], rel=1e-9), (t.number, key)
        for stage, ratio in t.user_attrs["candidate"]["ratios"].items():
            assert row[f"ratio.{stage}"] == pytest.approx(ratio)
        assert (
            row["reward"] == pytest.approx(t.user_attrs["reward"]) and bool(row["feasible"]) == t.user_attrs["feasible"]
        )
    assert csv["uniform"].notna().sum() == 1  # the uniform baseline is marked


def test_report_bad_input_is_clear(searched: Path, tmp_path: Path, tiny_data: Path):
    proc = _run("report", str(searched), "--trial", "99", cwd=tmp_path)
    assert proc.returncode == 2 and "trial 99" in proc.stderr
    empty = _config(tmp_path, tiny_data, "never-run")
    proc = _run("report", str(empty), cwd=tmp_path)
    assert proc.returncode == 2 and "yoloprune search" in proc.stderr, proc.stderr
