"""The orchestration benchmark, run small from the command line: every measurement completes,
the report holds the ratios, the CPU table and the cost model, and nothing is left behind.
It measures nothing here; the benchmark script is where the figures are read."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.ops.bench_runs import ROOT, assert_cleaned_up, run_script


@pytest.mark.unit
def test_cold_questions_are_never_asked_twice_and_warm_ones_repeat() -> None:
    sys.path.insert(0, str(ROOT))
    from ops.bench_orchestration import question_text

    fresh = [question_text(n, fresh=True) for n in range(10_240)]
    assert len(set(fresh)) == len(fresh)
    warm = [question_text(n, fresh=False) for n in range(160)]
    assert len(set(warm)) == 80 and warm[:80] == warm[80:]
    assert fresh[0].endswith(warm[0]) and fresh[0] != warm[0]


@pytest.mark.unit
def test_cpu_seconds_counts_this_process_and_grows_with_work() -> None:
    sys.path.insert(0, str(ROOT))
    from ops.bench_orchestration import cpu_seconds, cpu_since

    before = cpu_seconds({})
    sum(i * i for i in range(3_000_000))
    spent = cpu_since(before, cpu_seconds({}))
    assert spent["benchmark"] > 0


@pytest.mark.unit
def test_the_cost_model_fits_the_median_runs_not_each_round(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Three rounds at shards 32 and 64 of 4 and 2.5, 4.5 and 2.5, 4.5 and 3 ms per item: the
    fit to each size's median run (4.5 and 2.5) gives F = 128 ms and P = 0.5 ms; fitted
    round by round they would give F = 96, 128, 96 and P = 1, 0.5, 1.5 (medians 96 and 1)."""
    sys.path.insert(0, str(ROOT))
    from ops.bench_orchestration import Measurement, Round, report_model

    def run(shard: int, ms_per_item: float) -> Measurement:
        # CPU seconds over 1000 items: the same number as ms per item
        return Measurement(f"shard {shard}", shard, 1000, seconds=1.0,
                           cpu={"router": ms_per_item})

    rounds = [Round(run(1, 97.0), {32: run(32, at32), 64: run(64, at64)})
              for at32, at64 in ((4.0, 2.5), (4.5, 2.5), (4.5, 3.0))]
    report_model(rounds)

    out = capsys.readouterr().out
    assert "CPU model (medians of 3 rounds): F = 128.0 ms per shard (four stages), " \
           "P = 0.50 ms per item; naive 97.0 ms per item" in out, out
    # shard 32: 97/20 - 128/32 = 0.85; shard 64: 97/30 - 128/64 = 1.23 (to two places)
    assert "shard32 / naive >= 20x needs P <= 0.85 ms (now 0.50)" in out, out
    assert "shard64 / naive >= 30x needs P <= 1.23 ms (now 0.50)" in out, out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("services")
def test_small_warm_run_reports_ratios_cpu_and_cost_model_and_cleans_up() -> None:
    done = run_script("bench_orchestration.py", "--items", "64", "--naive-items", "8",
                      "--caches", "warm", "--repeat", "2")

    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    for label in ("naive (shard 1)", "shard 32", "shard 64", "in-process limit (32)"):
        for mark in ("", " #2"):  # each measurement once per round
            assert re.search(rf"^{re.escape(label + mark)}\s+\d+", out, re.M), out
    ratio = re.search(r"^shard32 / naive\s+([\d.]+)x\s+>=20x\s+(yes|NO)  rounds: ([\d.]+)x, "
                      r"([\d.]+)x$", out, re.M)
    assert ratio is not None, out
    value, _, first, second = ratio.groups()
    assert float(value) == pytest.approx((float(first) + float(second)) / 2, abs=0.01)  # median
    assert re.search(r"^shard 32\s+(\s+\d+\.\d\d){10}$", out, re.M), out  # the CPU table row
    charged = out.split("with each run charged its VACUUM (ANALYZE)", 1)
    assert len(charged) == 2, out  # the ratios as they would be with the maintenance charged
    assert re.search(r"^shard64 / naive\s+[\d.]+x  rounds: [\d.]+x, [\d.]+x$", charged[1],
                     re.M), out
    assert re.search(r"CPU model \(medians of 2 rounds\): F = -?[\d.]+ ms per shard", out), out
    assert_cleaned_up(done.stderr)


@pytest.mark.integration
@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)
def test_the_benchmark_vacuums_its_store_itself_between_runs(
        store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autovacuum is off for every table of the benchmark's database, so it cannot start in
    the middle of a measured run, and `settle` (before each run) vacuums and analyzes them."""
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import text

    from ops.bench_orchestration import Bench, parse_args
    from tests.services import wait_until
    from workers.store.engine import get_engine

    monkeypatch.setenv("SLUICE_DATABASE_URL", store_url)
    bench = Bench(parse_args(["--caches", "warm"]), tmp_path)
    bench.vacuum_by_hand()
    engine = get_engine(store_url)
    with engine.connect() as conn:
        options = dict(conn.execute(text(
            "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_tables t "
            "ON t.tablename = c.relname AND t.schemaname = current_schema()")).all())
    assert "requests" in options and "stage_runs" in options
    assert all(o is not None and "autovacuum_enabled=false" in o for o in options.values()), \
        options

    def vacuumed() -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(text(
                "SELECT relname FROM pg_stat_user_tables WHERE last_vacuum IS NOT NULL "
                "AND last_analyze IS NOT NULL")).scalars())

    assert "requests" not in vacuumed()
    assert bench.settle() >= 0.0  # the Postgres CPU it took
    assert wait_until(lambda: options.keys() <= vacuumed(), timeout_s=10)
