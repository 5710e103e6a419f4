"""The concurrent waits benchmark, run small from the command line: both ways of waiting are
measured in every round, the figures hang together, and nothing is left behind. It
measures nothing here; the benchmark script is where the figures are read."""

from __future__ import annotations

import re
import socket
import sys

import pytest

from tests.ops.bench_runs import ROOT, assert_cleaned_up, run_script


@pytest.mark.integration
@pytest.mark.usefixtures("services")
def test_store_connections_counts_this_processs_open_connections_to_the_port() -> None:
    import psycopg

    sys.path.insert(0, str(ROOT))
    from ops.bench_waits import store_connections

    before = store_connections(5432)
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres"), \
            psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres"):
        assert store_connections(5432) == before + 2
    with socket.create_connection(("127.0.0.1", 6379)):  # another port: not counted
        assert store_connections(5432) == before


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("services")
def test_small_run_measures_both_ways_in_every_round_and_cleans_up() -> None:
    done = run_script("bench_waits.py", "--waits", "4", "--rounds", "2")

    assert done.returncode == 0, done.stderr[-4000:]
    rows = re.findall(r"^([12])\s+(shared|own listener)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+"
                      r"([\d.]+)\s+([\d.]+)\s+([\d.]+)$", done.stdout, re.M)
    assert sorted((n, way) for n, way, *_ in rows) == [
        ("1", "own listener"), ("1", "shared"), ("2", "own listener"), ("2", "shared")]
    for _, way, peak, reads, p50, p95, top, seconds in rows:
        # Each own-listener wait holds a connection of its own while it waits
        assert int(peak) >= (4 if way == "own listener" else 1)
        assert float(reads) >= 1  # every wait reads its request at least once
        assert float(p50) <= float(p95) <= float(top)
        assert float(seconds) > 0
    assert re.search(r"^peak connections\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", done.stdout, re.M)
    assert_cleaned_up(done.stderr)
