"""Builders for golden cases and outcomes, so each test states only what it is about."""

from __future__ import annotations

from typing import Any

from ops.evals.score import cost, latency
from schemas.evals import CaseOutcome, EvalReport, Expect, GoldenCase, MetricValue


def case(case_id: str, area: str = "grounded", status: str = "succeeded", *,
         kind: str = "answer", canaries: list[str] | None = None, **expect: Any) -> GoldenCase:
    request: dict[str, Any] = ({"kind": "answer", "question": "why?"} if kind == "answer"
                               else {"kind": "document", "template": "incident_report", "topic": "t"})
    return GoldenCase(id=case_id, area=area, tenant="acme", request=request,  # type: ignore[arg-type]
                      expect=Expect(status=status, **expect), canaries=canaries or [])


def outcome(case_id: str, area: str = "grounded", status: str = "succeeded", **fields: Any) -> CaseOutcome:
    return CaseOutcome(case_id=case_id, area=area, request_id=f"r-{case_id}",  # type: ignore[arg-type]
                       status=status, **fields)


def report(metrics: dict[str, float | None], versions: dict[str, str] | None = None,
           outcomes: list[CaseOutcome] | None = None, failures: dict[str, list[str]] | None = None,
           ) -> EvalReport:
    """A scored run with the given metric values (support is made up to match)."""
    failures = failures or {}
    values = {name: MetricValue(name=name, value=v, cases=0 if v is None else 10,
                                passed=0 if v is None else round(v * 10), failures=failures.get(name, []))
              for name, v in metrics.items()}
    outcomes = outcomes or []
    return EvalReport(run_id="run-1", golden="golden.jsonl@abc123", versions=versions or {"router": "r1"},
                      metrics=values, latency_s=latency(outcomes), cost=cost(outcomes),
                      outcomes=outcomes, started_at="2025-01-01T00:00:00+00:00", wall_s=12.5)
