"""The generation benchmark's smoke test on a tiny random-weight model: it runs on CPU and its
figures are consistent. It measures nothing; the benchmark script is where speed is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.bench_generation import main

pytestmark = pytest.mark.unit


def test_tiny_random_run_writes_consistent_figures(tmp_path: Path) -> None:
    # Given a tiny random-weight model whose requests ignore end-of-sequence
    out = tmp_path / "figures.json"
    argv = ["--random-config", "tiny", "--requests", "8", "--naive-requests", "4",
            "--max-new-tokens", "8", "--device", "cpu", "--threads", "1", "--json", str(out)]

    # When the benchmark runs every mode
    assert main(argv) == 0

    # Then every mode made tokens, each engine request decoded exactly its own cap,
    # and the ratio is the quotient of the two rates it reports
    fig = json.loads(out.read_text())
    rates = fig["tokens_per_s"]
    assert rates["naive"] > 0 and rates["engine"] > 0 and rates["static"] > 0
    assert fig["requests"] == 8 and fig["naive_requests"] == 4
    assert [r["engine_tokens"] for r in fig["per_request"]] == \
        [r["max_new_tokens"] for r in fig["per_request"]]
    assert fig["modes"]["engine"]["tokens"] == sum(r["max_new_tokens"] for r in fig["per_request"])
    assert fig["ratio_engine_naive"] == pytest.approx(rates["engine"] / rates["naive"])
    assert fig["ratio_engine_static"] == pytest.approx(rates["engine"] / rates["static"])
