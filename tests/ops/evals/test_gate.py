"""The regression gate against a recorded baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.evals.gate import Regression, compare, load_baseline, write_baseline
from tests.ops.evals.builders import report

pytestmark = pytest.mark.unit

METRICS = {"status_accuracy": 0.9, "tenant_isolation": 1.0, "citation_precision": 0.8}


@pytest.fixture
def baseline_path(tmp_path: Path) -> Path:
    path = tmp_path / "baseline.json"
    write_baseline(report(METRICS, {"router": "r1", "generator": "g1"}), path, who="ana", why="first run")
    return path


def test_identical_metrics_pass(baseline_path: Path) -> None:
    result = compare(report(METRICS, {"router": "r1", "generator": "g1"}), load_baseline(baseline_path))

    assert result.passed
    assert (result.regressions, result.improvements, result.changed_components) == ([], [], {})
    assert result.describe() == "gate: passed"


def test_a_drop_beyond_tolerance_fails(baseline_path: Path) -> None:
    result = compare(report({**METRICS, "status_accuracy": 0.85}), load_baseline(baseline_path))

    assert not result.passed
    assert result.regressions == [Regression("status_accuracy", 0.9, 0.85, 2.0)]
    assert "regressed: status_accuracy 90.0% -> 85.0% (-5.0 pp, tolerance 2 pp)" in result.describe()


def test_a_drop_within_tolerance_passes(baseline_path: Path) -> None:
    result = compare(report({**METRICS, "status_accuracy": 0.88}), load_baseline(baseline_path))

    assert result.passed


def test_a_per_metric_tolerance_overrides_the_default(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    write_baseline(report(METRICS), path, who="ana", why="noisy metric",
                   tolerances_pp={"citation_precision": 10.0, "tenant_isolation": 0.0})
    baseline = load_baseline(path)

    loose = compare(report({**METRICS, "citation_precision": 0.72}), baseline)
    strict = compare(report({**METRICS, "tenant_isolation": 0.99}), baseline)

    assert loose.passed
    assert [r.metric for r in strict.regressions] == ["tenant_isolation"]
    assert strict.regressions[0].tolerance_pp == 0.0


def test_the_default_tolerance_is_a_parameter(baseline_path: Path) -> None:
    result = compare(report({**METRICS, "status_accuracy": 0.85}), load_baseline(baseline_path),
                     default_tolerance_pp=10.0)

    assert result.passed


def test_a_metric_no_longer_measured_fails(baseline_path: Path) -> None:
    result = compare(report({**METRICS, "citation_precision": None}), load_baseline(baseline_path))

    assert not result.passed
    assert result.regressions == [Regression("citation_precision", 0.8, None, 2.0)]
    assert "citation_precision 80.0% -> not measured" in result.describe()


def test_new_metrics_and_improvements_never_fail(baseline_path: Path) -> None:
    result = compare(report({**METRICS, "status_accuracy": 0.95, "tool_use": 0.1}),
                     load_baseline(baseline_path))

    assert result.passed
    assert [i.metric for i in result.improvements] == ["status_accuracy", "tool_use"]


def test_changed_components_are_named(baseline_path: Path) -> None:
    result = compare(report({**METRICS, "status_accuracy": 0.5}, {"router": "r2", "generator": "g1",
                                                                  "validator": "v1"}),
                     load_baseline(baseline_path))

    assert result.changed_components == {"router": ("r1", "r2"), "validator": ("", "v1")}
    text = result.describe()
    assert text.startswith("gate: FAILED")
    assert "changed component: router r1 -> r2" in text
    assert "changed component: validator (none) -> v1" in text


def test_write_baseline_records_who_why_and_when(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"

    write_baseline(report(METRICS, {"router": "r1"}), path, who=" ana ", why="new router")

    data = json.loads(path.read_text())
    assert (data["updated_by"], data["reason"]) == ("ana", "new router")
    assert data["metrics"] == METRICS and data["versions"] == {"router": "r1"}
    assert data["golden"] == "golden.jsonl@abc123" and data["updated_at"].startswith("20")


@pytest.mark.parametrize(("who", "why"), [("", "reason"), ("ana", "  ")])
def test_write_baseline_refuses_an_anonymous_or_unexplained_update(tmp_path: Path, who: str,
                                                                  why: str) -> None:
    path = tmp_path / "baseline.json"

    with pytest.raises(ValueError, match="needs"):
        write_baseline(report(METRICS), path, who=who, why=why)
    assert not path.exists()


def test_compare_accepts_the_baseline_as_a_dict(baseline_path: Path) -> None:
    data = json.loads(baseline_path.read_text())

    assert compare(report(METRICS), data).passed is True
