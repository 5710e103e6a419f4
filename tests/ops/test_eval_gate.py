"""The CI gate: the golden set's `ci` slice through the real pipeline, against the baseline
committed beside it. A drop beyond a metric's tolerance fails the build, naming the version
components that changed since the baseline was taken.

To move the baseline (explicitly, with who and why): run this test with
SLUICE_EVAL_REPORT_OUT=report.json, then `sluice baseline update report.json --baseline
ops/examples/golden/baseline-ci.json --by NAME --reason WHY`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[2] / "ops" / "examples" / "golden"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_ci_slice_holds_its_baseline(pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ops.evals import gate, report
    from ops.evals.runner import (
        build_report,
        load_golden,
        read_outcomes,
        record_run,
        resolved,
        run_cases,
        served_versions,
    )

    golden = load_golden(GOLDEN / "golden.jsonl", ["ci"])
    assert 20 <= len(golden.cases) <= 30
    cases = [resolved(c) for c in golden.cases]
    job_id, wall_s = run_cases(pipeline.settings, golden, spawn_workers=False, timeout_s=900)
    result = build_report(golden, cases, read_outcomes(pipeline.settings, job_id, cases),
                          served_versions(pipeline.settings, job_id), wall_s)
    if os.environ.get("SLUICE_EVAL_REPORT_OUT"):
        report.write_json(result, Path(os.environ["SLUICE_EVAL_REPORT_OUT"]))
    verdict = gate.compare(result, gate.load_baseline(GOLDEN / "baseline-ci.json"))
    record_run(pipeline.settings, result, job_id, "passed" if verdict.passed else "failed")
    report.write_html(result, tmp_path / "report.html", gate.load_baseline(
        GOLDEN / "baseline-ci.json"))
    print("\n" + verdict.describe())

    assert result.metrics["tenant_isolation"].value == 1.0
    assert verdict.passed, verdict.describe()
