"""The online latency benchmark, run small from the command line: both settings are measured
in every round, the figures are consistent, and nothing is left behind. It measures nothing
here; the benchmark script is where the figures are read."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.ops.bench_runs import ROOT, assert_cleaned_up, run_script


@pytest.mark.unit
def test_percentile_takes_the_nearest_rank() -> None:
    sys.path.insert(0, str(ROOT))
    from ops.bench_online import percentile

    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("services")
def test_small_run_reports_both_settings_and_cleans_up(tmp_path: Path) -> None:
    figures = tmp_path / "online.json"

    done = run_script("bench_online.py", "--online", "2", "--batch-items", "64",
                      "--shard-size", "32", "--rounds", "2", "--json", str(figures))

    assert done.returncode == 0, done.stderr[-4000:]
    rows = re.findall(r"^[12]\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x\s+"
                      r"([\d.]+)\s+(\d)/2$", done.stdout, re.M)
    assert len(rows) == 2, done.stdout
    fig = json.loads(figures.read_text())
    assert len(fig["rounds"]) == 2
    for round_ in fig["rounds"]:
        assert len(round_["idle_s"]) == 2 and len(round_["behind_s"]) == 2
        assert all(s > 0 for s in round_["idle_s"] + round_["behind_s"])
        assert 0 <= round_["before_batch"] <= 2 and round_["batch_s"] > 0
    assert fig["idle_ms"]["p50"] <= fig["idle_ms"]["max"]
    assert fig["online_behind"] == 4
    assert_cleaned_up(done.stderr)
