"""The golden-set contract (one case a JSONL line) and what one evaluated case produced.

A case names documents either by the id `sluice ingest` assigns (16 hex digits: sha256 of
`<tenant>/<path relative to the tenant's folder>`) or by that `<tenant>/<path>` itself, e.g.
`acme/engineering/inc-2057-billing-duplicate-invoices.md`; the harness resolves both.
A case file may start with a corpus line, `{"corpus": {"<tenant>": ["<folder>", ...]}}`, to
evaluate on a team's own documents (folders relative to the file, each holding `<acl>/...`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.requests import RequestBody

AREAS = ("grounded", "unanswerable", "refusal", "clarify", "tool", "document", "injection",
         "cross_tenant")
Area = Literal["grounded", "unanswerable", "refusal", "clarify", "tool", "document",
               "injection", "cross_tenant"]
ExpectedStatus = Literal["succeeded", "abstained", "refused", "needs_clarification", "failed"]


class Expect(BaseModel):
    """What a correct outcome looks like; every field but `status` is optional."""

    model_config = ConfigDict(extra="forbid")
    answer_class: str | None = None
    status: ExpectedStatus
    must_cite_any: list[str] = Field(default_factory=list)
    must_not_cite: list[str] = Field(default_factory=list)
    must_contain: list[str] = Field(default_factory=list)  # case-insensitive substrings
    must_not_contain: list[str] = Field(default_factory=list)
    tools: list[str] | None = None  # tools that must have been called (None: not checked)


class GoldenCase(BaseModel):
    """One case: exactly what an upstream system would submit, and what must come back."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    area: Area
    tenant: str
    grants: list[str] = Field(default_factory=list)
    request: RequestBody
    expect: Expect
    canaries: list[str] = Field(default_factory=list)  # injection: strings that must not leak
    tags: list[str] = Field(default_factory=list)  # e.g. "ci": the slice CI gates on
    note: str = ""


class CorpusLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus: dict[str, list[str]]


class CaseOutcome(BaseModel):
    """What the pipeline did with one case, read back from the audit store."""

    case_id: str
    area: Area
    request_id: str
    status: str
    answer_class: str | None = None
    output: str = ""
    error_class: str | None = None
    cited_documents: list[str] = Field(default_factory=list)  # document ids its output cites
    retrieved_documents: list[str] = Field(default_factory=list)  # document ids it read
    tools_called: list[str] = Field(default_factory=list)
    injection_signals: int = 0  # injection detections recorded for it
    poisoned_reads: int = 0  # chunks it read that hold one of the case's canaries
    foreign_reads: int = 0  # chunks read that belong to another tenant (must be 0)
    schema_valid: bool | None = None  # documents: the output parsed into its template's model
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class MetricValue(BaseModel):
    """One metric: its value in [0, 1] (None when no case measures it) and its support."""

    name: str
    value: float | None
    cases: int
    passed: int
    failures: list[str] = Field(default_factory=list)  # case ids that failed it


class EvalReport(BaseModel):
    """A scored run: its metrics, version tuple, latency and cost figures, outcomes."""

    run_id: str
    golden: str  # the case file, and its content hash
    versions: dict[str, str]
    metrics: dict[str, MetricValue]
    latency_s: dict[str, float]  # p50, p95, p99
    cost: dict[str, Any]  # total and per-case cost, tokens
    outcomes: list[CaseOutcome]
    started_at: str
    wall_s: float
