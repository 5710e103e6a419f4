"""The lease benchmark's smoke test: both settings are measured and the ratio is the
quotient of the two figures it prints. It measures nothing; the script is where speed is
read."""

from __future__ import annotations

import re

import pytest

from ops.bench_leases import main

pytestmark = pytest.mark.unit


def test_both_settings_print_figures_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stages", "3", "--rounds", "1"]) == 0

    rows = {m[1]: (float(m[2]), float(m[3]), float(m[4])) for m in re.finditer(
        r"^(quiet|one busy thread)\s+([\d.]+) us\s+([\d.]+) us\s+(\d+)x$",
        capsys.readouterr().out, re.MULTILINE)}
    assert set(rows) == {"quiet", "one busy thread"}
    for baseline_us, keeper_us, ratio in rows.values():
        assert baseline_us > 0 and keeper_us > 0
        assert ratio == pytest.approx(baseline_us / keeper_us, rel=0.05, abs=1)


def test_a_count_below_one_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--stages", "0"])
