"""What the benchmark smoke tests share: running a benchmark script, and checking that it
left nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """ops/`script` with `argv`, outside any SLUICE_* setting of the test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, str(ROOT / "ops" / script), *argv], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def assert_cleaned_up(stderr: str) -> None:
    """The benchmark said it cleaned up, and the database it named is gone."""
    import psycopg

    assert "cleaned up" in stderr
    database = re.search(r"database (sluice_bench_\w+)", stderr)
    assert database is not None
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres") as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (database.group(1),)).fetchone()
    assert left is None
