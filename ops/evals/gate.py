"""The regression gate: a run's metrics against a recorded baseline, metric by metric.

A baseline is a JSON file written only on purpose (`write_baseline`, with who and why), so a
worse run never becomes the new normal by accident:

    {"golden": ..., "versions": {...}, "metrics": {name: value or null},
     "tolerances_pp": {name: float}, "updated_by": ..., "reason": ..., "updated_at": ISO}

A metric regresses when it drops more than its tolerance (percentage points) below the
baseline, or when the baseline measured it and the run does not. New metrics never fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from schemas.evals import EvalReport


class Baseline(BaseModel):
    """A recorded run the gate compares against."""

    golden: str
    versions: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float | None]
    tolerances_pp: dict[str, float] = Field(default_factory=dict)
    updated_by: str
    reason: str
    updated_at: str


@dataclass(frozen=True)
class Regression:
    """A metric that fell below its baseline by more than its tolerance (current None: gone)."""

    metric: str
    baseline: float
    current: float | None
    tolerance_pp: float


@dataclass(frozen=True)
class Improvement:
    metric: str
    baseline: float | None
    current: float


@dataclass
class GateResult:
    """The verdict, the metrics behind it, and which version components changed."""

    passed: bool
    regressions: list[Regression] = field(default_factory=list)
    improvements: list[Improvement] = field(default_factory=list)
    changed_components: dict[str, tuple[str, str]] = field(default_factory=dict)

    def describe(self) -> str:
        """Lines a person reads in CI: the verdict, each regression, each changed component."""
        lines = ["gate: passed" if self.passed else "gate: FAILED"]
        lines += [_describe_regression(r) for r in self.regressions]
        lines += [f"improved: {i.metric} {_pct(i.baseline)} -> {_pct(i.current)}" for i in self.improvements]
        lines += [f"changed component: {name} {old or '(none)'} -> {new or '(none)'}"
                  for name, (old, new) in sorted(self.changed_components.items())]
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _describe_regression(r: Regression) -> str:
    if r.current is None:
        return f"regressed: {r.metric} {_pct(r.baseline)} -> not measured"
    drop_pp = (r.baseline - r.current) * 100
    return (f"regressed: {r.metric} {_pct(r.baseline)} -> {_pct(r.current)} "
            f"(-{drop_pp:.1f} pp, tolerance {r.tolerance_pp:g} pp)")


def load_baseline(path: str | Path) -> Baseline:
    """Read a baseline file; raises FileNotFoundError or pydantic's ValidationError."""
    return Baseline.model_validate_json(Path(path).read_text(encoding="utf-8"))


def write_baseline(report: EvalReport, path: str | Path, who: str, why: str,
                   tolerances_pp: dict[str, float] | None = None) -> Baseline:
    """Record `report` as the new baseline; who and why are required, and kept in the file."""
    if not who.strip():
        raise ValueError(f"a baseline update needs who made it, got {who!r}")
    if not why.strip():
        raise ValueError(f"a baseline update needs a reason, got {why!r}")
    baseline = Baseline(
        golden=report.golden, versions=dict(report.versions),
        metrics={name: m.value for name, m in report.metrics.items()},
        tolerances_pp=dict(tolerances_pp or {}), updated_by=who.strip(), reason=why.strip(),
        updated_at=datetime.now(UTC).isoformat(timespec="seconds"))
    Path(path).write_text(json.dumps(baseline.model_dump(), indent=2) + "\n", encoding="utf-8")
    return baseline


def _changed_components(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str, str]]:
    names = sorted(set(old) | set(new))
    return {n: (old.get(n, ""), new.get(n, "")) for n in names if old.get(n) != new.get(n)}


def _judge(name: str, was: float | None, now: float | None,
           tolerance_pp: float) -> Regression | Improvement | None:
    if was is None:
        return None if now is None else Improvement(name, None, now)
    # The epsilon keeps a drop of exactly the tolerance within it, despite float rounding.
    if now is None or now < was - tolerance_pp / 100 - 1e-9:
        return Regression(name, was, now, tolerance_pp)
    return Improvement(name, was, now) if now > was else None


def compare(report: EvalReport, baseline: Baseline | dict[str, Any],
            default_tolerance_pp: float = 2.0) -> GateResult:
    """Gate `report` on `baseline`: fails when any metric regressed beyond its tolerance."""
    if not isinstance(baseline, Baseline):
        baseline = Baseline.model_validate(baseline)
    result = GateResult(passed=True,
                        changed_components=_changed_components(baseline.versions, report.versions))
    current = {name: m.value for name, m in report.metrics.items()}
    for name in sorted(set(baseline.metrics) | set(current)):
        tolerance = baseline.tolerances_pp.get(name, default_tolerance_pp)
        verdict = _judge(name, baseline.metrics.get(name), current.get(name), tolerance)
        if isinstance(verdict, Regression):
            result.regressions.append(verdict)
        elif isinstance(verdict, Improvement):
            result.improvements.append(verdict)
    result.passed = not result.regressions
    return result
