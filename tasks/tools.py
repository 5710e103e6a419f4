"""Governed tools: a registry of typed, versioned, allowlisted tools and a rule-based planner.

A tool runs only from a `ToolCall` that passed `ToolRegistry.validate`: the tool exists, the
tenant is on its allowlist, the arguments parse into its pydantic model, and a tool with side
effects carries an idempotency key. The planner builds calls from a `tool_lookup` request's
text by fixed rules; retrieved text and model output never become calls.

This module is pure (no database): `workers.store.records` executes validated calls against
the system of record and records them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ALL_TENANTS = "*"
TICKET_ID_PATTERN = r"^INC-[0-9]{3,8}$"
MAX_LIST_LIMIT = 50
DEFAULT_LIST_LIMIT = 20

ToolOutcome = Literal["ok", "error"]
# How a result was served: the tool ran; a read-only result younger than its cache TTL; or
# the recorded result of a side-effect call that had already run under the same key.
ServedFrom = Literal["executed", "cache", "recorded"]


class ToolError(Exception):
    """Base of the tool errors: a call that must not run."""


class UnknownTool(ToolError):
    """The call names a tool the registry does not hold."""


class ToolArgumentError(ToolError):
    """The arguments do not fit the tool's schema, or a side-effect call has no key."""


class ToolNotAllowed(ToolError):
    """The tenant is not on the tool's allowlist."""


class ToolFailed(ToolError):
    """Raised by a tool implementation for a domain failure (e.g. no such ticket): the call
    ends as an `error` result with `error_class`, never as an infrastructure error."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


# -- argument models ------------------------------------------------------------------


class ToolArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class TicketIdArgs(ToolArgs):
    ticket_id: str = Field(pattern=TICKET_ID_PATTERN, description="an incident id, e.g. INC-2057")

    @field_validator("ticket_id", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        """"inc-2057" means INC-2057; anything else is reported as it was given."""
        if isinstance(value, str) and re.fullmatch(TICKET_ID_PATTERN, value.strip().upper()):
            return value.strip().upper()
        return value


class GetTicketArgs(TicketIdArgs):
    pass


class ListOpenTicketsArgs(ToolArgs):
    limit: int = Field(default=DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT)


class CurrentTimeArgs(ToolArgs):
    pass


class AddTicketNoteArgs(TicketIdArgs):
    note: str = Field(min_length=1, max_length=2000)


# -- specs, calls, results ------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """One tool's contract. `allowed_tenants` is a set of tenant ids or `"*"` for all."""

    name: str
    version: str
    args_model: type[ToolArgs]
    description: str
    allowed_tenants: frozenset[str] | Literal["*"] = ALL_TENANTS
    timeout_s: float = 2.0
    cache_ttl_s: float = 0.0
    side_effects: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", self.name):
            raise ValueError(f"tool name must be snake_case, at most 64 chars, got {self.name!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"{self.name}: timeout_s must be > 0, got {self.timeout_s}")
        if self.cache_ttl_s < 0:
            raise ValueError(f"{self.name}: cache_ttl_s must be >= 0, got {self.cache_ttl_s}")
        if self.side_effects and self.cache_ttl_s:
            raise ValueError(f"{self.name}: a tool with side effects cannot be cached, "
                             f"got cache_ttl_s={self.cache_ttl_s}")

    def allows(self, tenant: str) -> bool:
        return self.allowed_tenants == ALL_TENANTS or tenant in self.allowed_tenants

    def fingerprint(self) -> dict[str, Any]:
        """Everything that defines the contract, for the registry's version."""
        allowed = (self.allowed_tenants if self.allowed_tenants == ALL_TENANTS
                   else sorted(self.allowed_tenants))
        return {"name": self.name, "version": self.version, "allowed": allowed,
                "schema": self.args_model.model_json_schema(), "timeout_s": self.timeout_s,
                "cache_ttl_s": self.cache_ttl_s, "side_effects": self.side_effects}


class ToolCall(BaseModel):
    """A request to run one tool, as a plan (or an upstream system) states it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)


@dataclass(frozen=True)
class ValidatedCall:
    """A call that passed the registry's checks; the only thing an executor accepts."""

    spec: ToolSpec
    tenant: str
    grants: frozenset[str]  # the calling request's: what the tool may read for it
    args: ToolArgs
    idempotency_key: str | None
    call_id: str

    @property
    def args_json(self) -> dict[str, Any]:
        return self.args.model_dump(mode="json")


@dataclass(frozen=True)
class ToolOutput:
    """What an implementation returns: a title and text the model can cite, and the data."""

    title: str
    content: str
    data: dict[str, Any] = field(default_factory=dict)


class ToolResult(BaseModel):
    """One call's result; `call_id` is stable for the same tool, version, tenant, grants,
    arguments (and key), so a repeated call and its citation resolve to the same id."""

    call_id: str
    tool: str
    version: str
    tenant: str
    args: dict[str, Any]
    idempotency_key: str | None = None
    title: str
    content: str
    data: dict[str, Any] = Field(default_factory=dict)
    result_hash: str
    duration_s: float
    outcome: ToolOutcome
    error_class: str | None = None
    served_from: ServedFrom = "executed"

    @property
    def chunk_id(self) -> str:
        return f"tool:{self.call_id}"

    def as_evidence(self) -> dict[str, Any]:
        """The result as a `RetrievedChunk`-compatible dict, citable like a retrieved chunk."""
        return {"chunk_id": self.chunk_id, "document_id": f"tool:{self.tool}",
                "title": self.title, "text": self.content, "score": 1.0}

    def audit_payload(self) -> dict[str, Any]:
        """The audit event for this call: tool, version, arguments, hash, duration, outcome."""
        return {"call_id": self.call_id, "tool": self.tool, "version": self.version,
                "args": self.args, "idempotency_key": self.idempotency_key,
                "result_hash": self.result_hash, "duration_s": round(self.duration_s, 6),
                "outcome": self.outcome, "error_class": self.error_class,
                "served_from": self.served_from}


def refusal_payload(call: ToolCall, error: ToolError) -> dict[str, Any]:
    """The audit event of a call refused before anything ran (unknown tool, a tenant off the
    allowlist, bad arguments): the same fields as a result's, with outcome `refused`."""
    return {"call_id": None, "tool": call.tool, "version": None, "args": call.args,
            "idempotency_key": call.idempotency_key, "result_hash": None, "duration_s": 0.0,
            "outcome": "refused", "error_class": type(error).__name__,
            "message": str(error)[:500], "served_from": None}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def sha256_hex(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def call_id_for(spec: ToolSpec, tenant: str, grants: Iterable[str], args: Mapping[str, Any],
                idempotency_key: str | None) -> str:
    """The grants are part of the id: a result read under some grants (and kept by the
    cache under this id) is not served to a caller with others."""
    key = [spec.name, spec.version, tenant, sorted(set(grants)), dict(args), idempotency_key]
    return "tc-" + sha256_hex(key)[:24]


def result_hash(outcome: ToolOutcome, error_class: str | None, content: str,
                data: Mapping[str, Any]) -> str:
    return sha256_hex({"outcome": outcome, "error_class": error_class, "content": content,
                       "data": dict(data)})


def ok_result(call: ValidatedCall, output: ToolOutput, duration_s: float) -> ToolResult:
    return _result(call, "ok", None, output, duration_s)


def error_result(call: ValidatedCall, error_class: str, message: str,
                 duration_s: float) -> ToolResult:
    output = ToolOutput(title=f"{call.spec.name} failed", content=message,
                        data={"error": error_class})
    return _result(call, "error", error_class, output, duration_s)


def _result(call: ValidatedCall, outcome: ToolOutcome, error_class: str | None,
            output: ToolOutput, duration_s: float) -> ToolResult:
    return ToolResult(
        call_id=call.call_id, tool=call.spec.name, version=call.spec.version, tenant=call.tenant,
        args=call.args_json, idempotency_key=call.idempotency_key, title=output.title,
        content=output.content, data=output.data, duration_s=duration_s, outcome=outcome,
        error_class=error_class,
        result_hash=result_hash(outcome, error_class, output.content, output.data))


# -- the registry ---------------------------------------------------------------------


class ToolRegistry:
    """The tools a deployment offers; `version` names the whole contract (tool schemas)."""

    def __init__(self, specs: Iterable[ToolSpec]) -> None:
        self._specs: dict[str, ToolSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"tool {spec.name!r} is registered twice")
            self._specs[spec.name] = spec
        self.version = "tools-" + sha256_hex([s.fingerprint() for s in self.specs])[:16]

    @property
    def specs(self) -> list[ToolSpec]:
        return [self._specs[name] for name in sorted(self._specs)]

    def get(self, name: str) -> ToolSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise UnknownTool(f"unknown tool {name!r}; registered: {sorted(self._specs)}")
        return spec

    def validate(self, tenant: str, call: ToolCall, grants: Iterable[str]) -> ValidatedCall:
        """Check a call before anything runs: tool, allowlist, arguments, idempotency key;
        `grants` are the calling request's.

        A read-only call ignores an idempotency key: it is not part of its id.
        """
        spec = self.get(call.tool)
        if not spec.allows(tenant):
            raise ToolNotAllowed(f"tenant {tenant!r} may not call tool {spec.name!r}")
        args = _parse_args(spec, call.args)
        if spec.side_effects and not call.idempotency_key:
            raise ToolArgumentError(f"{spec.name} has side effects and needs an idempotency "
                                    f"key, got {call.idempotency_key!r}")
        key = call.idempotency_key if spec.side_effects else None
        granted = frozenset(grants)
        call_id = call_id_for(spec, tenant, granted, args.model_dump(mode="json"), key)
        return ValidatedCall(spec, tenant, granted, args, key, call_id)


def _parse_args(spec: ToolSpec, raw: Mapping[str, Any]) -> ToolArgs:
    try:
        return spec.args_model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ToolArgumentError(f"{spec.name} arguments are invalid: {problems}") from None


def _problem(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "arguments"
    return f"{where}: {error['msg']} (got {error['input']!r})"


def default_registry(
        allowlists: Mapping[str, frozenset[str] | Literal["*"]] | None = None) -> ToolRegistry:
    """The shipped tools over the ticket system of record; `allowlists` overrides a tool's
    tenants by tool name (every tenant by default)."""
    allowed = dict(allowlists or {})
    check_allowlists(allowed)
    return ToolRegistry(_with_allowlist(spec, allowed.get(name, ALL_TENANTS))
                        for name, spec in SHIPPED_TOOLS.items())


def check_allowlists(allowlists: Mapping[str, object]) -> None:
    """ValueError when `allowlists` names a tool that is not shipped."""
    unknown = set(allowlists) - set(SHIPPED_TOOLS)
    if unknown:
        raise ValueError(f"allowlists name unknown tools {sorted(unknown)}; "
                         f"tools: {sorted(SHIPPED_TOOLS)}")


def _with_allowlist(spec: ToolSpec, tenants: frozenset[str] | Literal["*"]) -> ToolSpec:
    return ToolSpec(spec.name, spec.version, spec.args_model, spec.description, tenants,
                    spec.timeout_s, spec.cache_ttl_s, spec.side_effects)


# The system of record is the point of these tools: no read-only tool is cached by default.
SHIPPED_TOOLS: dict[str, ToolSpec] = {
    spec.name: spec for spec in (
        # 2: a ticket the caller's grants do not cover is not found (and not listed, noted)
        ToolSpec("get_ticket", "2", GetTicketArgs,
                 "One incident ticket of the caller's tenant, as it stands now."),
        ToolSpec("list_open_tickets", "2", ListOpenTicketsArgs,
                 "The caller's tenant's open tickets, most severe and newest first."),
        ToolSpec("current_time", "1", CurrentTimeArgs, "The current time in UTC.",
                 timeout_s=0.5),
        ToolSpec("add_ticket_note", "2", AddTicketNoteArgs,
                 "Append a note to one of the caller's tenant's tickets.", side_effects=True),
    )
}


# -- the planner ----------------------------------------------------------------------

_TICKET_ID = re.compile(r"\bINC[-\s]?(\d{3,8})\b"
                        r"|\b(?:incident|ticket)\s*(?:#|no\.?|number)?\s*(\d{4,8})\b", re.IGNORECASE)
_OPEN_TICKETS = re.compile(
    r"\b(?:open|unresolved|active|ongoing)\s+(?:\w+\s+){0,2}(?:tickets?|incidents?)\b"
    r"|\b(?:tickets?|incidents?)\s+(?:\w+\s+){0,3}(?:open|unresolved|in\s+progress)\b"
    r"|\blist\s+(?:\w+\s+){0,2}(?:tickets|incidents)\b"
    r"|\b(?:ticket|incident)\s+(?:queue|list)\b"
    r"|\bopen\s+in\s+the\s+tracker\b", re.IGNORECASE)
_LIMIT = re.compile(r"\b(?:top|first|last|latest|newest|oldest)?\s*(\d{1,3})\s+"
                    r"(?:\w+\s+){0,2}(?:tickets|incidents)\b", re.IGNORECASE)
_CURRENT_TIME = re.compile(
    r"\bwhat\s+time\s+is\s+it\b"
    r"|\bwhat(?:'s|\s+is)\s+the\s+(?:current\s+)?(?:utc\s+)?(?:time|date)\b"
    r"|\bcurrent\s+(?:utc\s+)?(?:time|date|timestamp)\b"
    r"|\btoday'?s\s+date\b|\bdate\s+today\b|\b(?:day|date)\s+(?:of\s+the\s+week\s+)?is\s+it\b"
    r"|\btime\s+now\b|\bclock\b|\bweek\s+number\b|\bweekend\s+today\b|\buntil\s+midnight\b"
    r"|\bpast\s+\d{1,2}:\d{2}\b.*\bnow\b", re.IGNORECASE)


def plan_tool_call(text: str) -> ToolCall | None:
    """Map a `tool_lookup` request's text to one read-only call, by fixed rules, or None.

    In order: exactly one ticket id (INC-2057, "ticket #2057") -> `get_ticket`; a request for
    open tickets or the ticket queue -> `list_open_tickets` (with "5 open tickets" as the
    limit); a question about the current time or date -> `current_time`. Several different
    ticket ids are ambiguous (None). The planner never plans a tool with side effects: those
    come only from an upstream system's explicit call with its idempotency key. The rules
    are the same for every tenant; the executor scopes each call to the caller's tenant.
    """
    ids = _ticket_ids(text)
    if ids:
        return ToolCall(tool="get_ticket", args={"ticket_id": ids[0]}) if len(ids) == 1 else None
    if _OPEN_TICKETS.search(text):
        return ToolCall(tool="list_open_tickets", args={"limit": _limit(text)})
    if _CURRENT_TIME.search(text):
        return ToolCall(tool="current_time")
    return None


def _ticket_ids(text: str) -> list[str]:
    found = (f"INC-{m.group(1) or m.group(2)}" for m in _TICKET_ID.finditer(text))
    return list(dict.fromkeys(found))


def _limit(text: str) -> int:
    match = _LIMIT.search(text)
    if match is None:
        return DEFAULT_LIST_LIMIT
    return max(1, min(MAX_LIST_LIMIT, int(match.group(1))))
