"""`sluice versions`: the tuples that served requests in a window, and their eval runs;
`sluice baseline update` refusing an update without who and why, or without a report."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.evals.versions import eval_runs_by_tuple, traffic_by_tuple, tuple_key
from schemas.requests import RequestLine
from schemas.status import DriftPolicy, Lane
from schemas.versions import VersionTuple
from workers.settings import Settings
from workers.store.admission import admit_one
from workers.store.engine import session_scope
from workers.store.models import EvalRun

OLD = VersionTuple(model="m1", prompt="p", router="r", index="i", tool_schemas="t",
                   validators="v", decoding="d", runtime="x")
NEW = OLD.model_copy(update={"model": "m2"})


def _line(n: int) -> RequestLine:
    return RequestLine.model_validate({"custom_id": f"c{n}", "tenant": "acme",
                                       "grants": ["public"],
                                       "request": {"kind": "answer", "question": "Hello?"}})


@pytest.mark.integration
def test_traffic_is_grouped_by_pinned_tuple(store_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=store_url, data_dir=tmp_path)
    with session_scope(store_url) as session:
        for n, versions in enumerate([OLD, NEW, NEW]):
            admit_one(session, _line(n), versions, DriftPolicy.FOLLOW, Lane.ONLINE)
        session.add(EvalRun(id="eval-1", golden="g#1", job_id=None,
                            versions=NEW.model_dump(), metrics={"routing_accuracy": 0.9},
                            cases=3, gate="passed", wall_s=1.0))

    traffic = traffic_by_tuple(settings, datetime.now(UTC) - timedelta(hours=1))
    runs = eval_runs_by_tuple(settings)

    assert sorted(t.requests for t in traffic) == [1, 2]
    assert {t.versions["model"] for t in traffic} == {"m1", "m2"}
    assert all(t.statuses == {"queued": t.requests} for t in traffic)
    assert [r.id for r in runs[tuple_key(NEW.model_dump())]] == ["eval-1"]
    assert traffic_by_tuple(settings, datetime.now(UTC) + timedelta(hours=1)) == []


@pytest.mark.unit
def test_a_baseline_update_needs_who_and_why(tmp_path: Path) -> None:
    from ops.cli import app

    report = tmp_path / "report.json"
    report.write_text(json.dumps({
        "run_id": "eval-x", "golden": "g#1", "versions": {"model": "m"}, "metrics": {
            "routing_accuracy": {"name": "routing_accuracy", "value": 1.0, "cases": 2,
                                 "passed": 2}},
        "latency_s": {}, "cost": {}, "outcomes": [], "started_at": "now", "wall_s": 1.0}))
    baseline = tmp_path / "baseline.json"
    runner = CliRunner()

    refused = runner.invoke(app, ["baseline", "update", str(report), "--baseline",
                                  str(baseline), "--by", " ", "--reason", "because"])
    assert refused.exit_code == 1 and not baseline.exists()
    written = runner.invoke(app, ["baseline", "update", str(report), "--baseline",
                                  str(baseline), "--by", "ana", "--reason", "new model",
                                  "--tolerance", "routing_accuracy=5"])

    assert written.exit_code == 0, written.output
    saved = json.loads(baseline.read_text())
    assert (saved["updated_by"], saved["reason"]) == ("ana", "new model")
    assert saved["tolerances_pp"] == {"routing_accuracy": 5.0}
    assert saved["metrics"] == {"routing_accuracy": 1.0}


@pytest.mark.unit
def test_a_baseline_update_from_a_missing_report_says_which(tmp_path: Path) -> None:
    from ops.cli import app

    baseline = tmp_path / "baseline.json"
    result = CliRunner().invoke(app, ["baseline", "update", str(tmp_path / "nope.json"),
                                      "--baseline", str(baseline), "--by", "ana",
                                      "--reason", "new model"])

    assert result.exit_code == 1
    assert "no report at" in result.output and "nope.json" in result.output
    assert "Errno" not in result.output and not baseline.exists()
