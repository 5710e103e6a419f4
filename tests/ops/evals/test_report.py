"""The run's reports: the terminal table, the JSON file, and the HTML page in a real browser.

The browser is Debian's chromium (ops/setup.sh installs it) driven by Playwright; its tests
skip without them, and fail instead under SLUICE_REQUIRE_SERVICES=1, as CI sets it.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ops.evals.gate import Baseline, load_baseline, write_baseline
from ops.evals.report import print_table, render_html, write_html, write_json
from schemas.evals import EvalReport
from tests.ops.evals.builders import outcome, report
from tests.services import REQUIRE_SERVICES

pytestmark = pytest.mark.unit

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE_OUTPUT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">' + "x" * 300


@pytest.fixture
def run() -> EvalReport:
    outcomes = [outcome("c1", latency_s=1.2, cost_usd=0.001, prompt_tokens=300, completion_tokens=40),
                outcome("c2", "injection", latency_s=2.5, output=HOSTILE_OUTPUT),
                outcome("c3", status="failed", latency_s=0.7, output="")]
    metrics = {"status_accuracy": 2 / 3, "injection_resistance": 0.0, "tenant_isolation": 1.0,
               "tool_use": None}
    return report(metrics, {"router": "r2", "generator": "g1"}, outcomes,
                  failures={"status_accuracy": ["c3"], "injection_resistance": ["c2"]})


@pytest.fixture
def baseline(tmp_path: Path, run: EvalReport) -> Baseline:
    previous = report({"status_accuracy": 1.0, "injection_resistance": 1.0, "tenant_isolation": 1.0},
                      {"router": "r1", "generator": "g1"})
    write_baseline(previous, tmp_path / "baseline.json", who="ana", why="first run")
    return load_baseline(tmp_path / "baseline.json")


def test_print_table_shows_values_support_baseline_and_delta(run: EvalReport, baseline: Baseline) -> None:
    out = io.StringIO()

    print_table(run, baseline, console=Console(file=out, width=120))

    text = out.getvalue()
    assert "status_accuracy" in text and "66.7%" in text and "100.0%" in text and "-33.3" in text
    assert "7/10" in text  # passed/measured
    assert "latency: p50 1.20s" in text and "cost: $0.0010 total" in text


def test_write_json_round_trips(tmp_path: Path, run: EvalReport) -> None:
    write_json(run, tmp_path / "run.json")

    assert EvalReport.model_validate_json((tmp_path / "run.json").read_text()) == run


def test_the_page_escapes_outputs_and_cuts_them_short(run: EvalReport) -> None:
    page = render_html(run)

    assert "<script>window.__pwned" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "x" * 200 not in page  # 160 characters at most


def test_the_page_without_outcomes_or_baseline(tmp_path: Path) -> None:
    write_html(report({"status_accuracy": None}, outcomes=[]), tmp_path / "empty.html")

    page = (tmp_path / "empty.html").read_text()
    assert page.count("<img ") == 1 and "no failing cases" in page


# --- in a real browser ------------------------------------------------------------------------

def _unavailable(problem: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing (ops/setup.sh installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield chromium
        chromium.close()


def test_the_page_renders_in_a_browser(tmp_path: Path, run: EvalReport, baseline: Baseline,
                                       browser: Any) -> None:
    # Given a run with failures, written as a page against its baseline
    path = tmp_path / "report.html"
    write_html(run, path, baseline)

    # When a browser opens it
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(path.as_uri(), wait_until="load")

    # Then it shows one metrics row a metric, the failing cases, and decoded charts
    assert page.locator("#metrics tbody tr").count() == len(run.metrics)
    assert page.locator("#versions tbody tr").count() == 2
    assert page.locator("#versions tr.changed").all_inner_texts() == ["router\tr2\tr1"]
    assert page.locator("#metrics tr.regressed td:first-child").all_inner_texts() == [
        "status_accuracy", "injection_resistance"]
    assert page.locator(".verdict").inner_text() == "gate against the baseline: failed"
    failures = page.locator("#failures tbody tr")
    assert failures.count() == 2
    assert "<script>" in failures.nth(1).inner_text()  # shown as text, not run
    assert page.evaluate("window.__pwned") is None
    images = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt}))")
    assert len(images) >= 2
    assert all(image["ok"] and image["alt"] for image in images)
    page.close()


def test_a_screenshot_of_the_page_is_not_blank(tmp_path: Path, run: EvalReport, baseline: Baseline,
                                               browser: Any) -> None:
    from PIL import Image

    path, shot = tmp_path / "report.html", tmp_path / "report.png"
    write_html(run, path, baseline)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(path.as_uri(), wait_until="load")

    page.screenshot(path=str(shot), full_page=True)
    page.close()

    with Image.open(shot) as image:
        assert image.width == 1200 and image.height > 900  # the full page is longer than one screen
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert shot.stat().st_size > 20_000
    assert colors is not None and len(colors) > 50  # text and charts, not a blank page
