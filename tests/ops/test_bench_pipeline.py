"""The pipeline overhead benchmark, run small from the command line: both runs complete,
agree on their tokens, and the figures it writes are consistent. It measures nothing; the
benchmark script is where the overhead is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ops" / "bench_pipeline.py"


def _bench_env() -> dict[str, str]:
    """The benchmark makes its own database, key prefix and settings: none of conftest's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}


@pytest.mark.usefixtures("services")
def test_small_run_writes_consistent_figures(tmp_path: Path) -> None:
    # Given a small job: four requests in shards of two, eight new tokens each
    out = tmp_path / "figures.json"
    command = [sys.executable, str(SCRIPT), "--requests", "4", "--shard-size", "2",
               "--max-new-tokens", "8", "--json", str(out)]

    # When the benchmark runs the pipeline and then the engine alone
    done = subprocess.run(command, env=_bench_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)

    # Then both runs took time and made the same tokens, request by request,
    # and the overhead is the one the two timings give
    assert done.returncode == 0, done.stderr[-4000:]
    fig = json.loads(out.read_text())
    seconds = fig["seconds"]
    assert seconds["pipeline"] > 0 and seconds["engine"] > 0
    assert fig["generated_requests"] > 0
    assert fig["agreement"]["completion_tokens"] == 1.0
    assert fig["completion_tokens"]["pipeline"] == fig["completion_tokens"]["engine"] > 0
    assert fig["overhead"] == pytest.approx(1 - seconds["engine"] / seconds["pipeline"])
    assert "cleaned up" in done.stderr
