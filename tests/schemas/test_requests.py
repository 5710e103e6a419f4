"""The request contract: one JSONL line in, a RequestLine or a precise MalformedLine out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.requests import (
    AnswerRequest,
    DocumentRequest,
    MalformedLine,
    RequestLine,
    parse_request_line,
)

pytestmark = [pytest.mark.unit]


def _line(**overrides: object) -> str:
    data: dict[str, object] = {
        "custom_id": "req-1",
        "tenant": "acme",
        "grants": ["staff"],
        "request": {"kind": "answer", "question": "How do I rotate the VPN certificate?"},
    }
    data.update(overrides)
    return json.dumps(data)


def test_valid_answer_line_parses_to_request_line() -> None:
    parsed = parse_request_line(_line(deadline_s=30), line_no=1)

    assert isinstance(parsed, RequestLine)
    assert parsed.custom_id == "req-1"
    assert parsed.tenant == "acme"
    assert parsed.grants == ["staff"]
    assert parsed.deadline_s == 30
    assert isinstance(parsed.request, AnswerRequest)
    assert parsed.request.question == "How do I rotate the VPN certificate?"
    assert parsed.query_text == "How do I rotate the VPN certificate?"


def test_valid_document_line_parses_to_document_request() -> None:
    body = {"kind": "document", "template": "runbook_brief", "topic": "disk full alerts",
            "inputs": {"service": "billing-api", "priority": 2}}
    parsed = parse_request_line(_line(request=body), line_no=4)

    assert isinstance(parsed, RequestLine)
    assert isinstance(parsed.request, DocumentRequest)
    assert parsed.request.template == "runbook_brief"
    assert parsed.request.inputs == {"service": "billing-api", "priority": 2}
    # Retrieval searches a document request by its topic.
    assert parsed.query_text == "disk full alerts"


def test_invalid_json_is_malformed_with_reason() -> None:
    parsed = parse_request_line('{"custom_id": "req-1", ', line_no=7)

    assert isinstance(parsed, MalformedLine)
    assert parsed.line_no == 7
    assert parsed.reason.startswith("not valid JSON")
    assert parsed.custom_id is None


def test_non_object_json_is_malformed() -> None:
    parsed = parse_request_line("[1, 2, 3]", line_no=2)

    assert isinstance(parsed, MalformedLine)
    assert "JSON object" in parsed.reason
    assert "list" in parsed.reason


def test_missing_tenant_is_malformed_and_names_the_field() -> None:
    data = json.loads(_line())
    del data["tenant"]

    parsed = parse_request_line(json.dumps(data), line_no=3)

    assert isinstance(parsed, MalformedLine)
    assert "tenant" in parsed.reason


def test_unknown_kind_is_malformed() -> None:
    parsed = parse_request_line(_line(request={"kind": "poem", "question": "hi"}), line_no=1)

    assert isinstance(parsed, MalformedLine)
    assert "request" in parsed.reason


def test_extra_unknown_field_is_malformed() -> None:
    parsed = parse_request_line(_line(priority="urgent"), line_no=1)

    assert isinstance(parsed, MalformedLine)
    assert "priority" in parsed.reason


def test_extra_field_inside_request_body_is_malformed() -> None:
    body = {"kind": "answer", "question": "q?", "temperature": 2}
    parsed = parse_request_line(_line(request=body), line_no=1)

    assert isinstance(parsed, MalformedLine)
    assert "temperature" in parsed.reason


def test_bad_grant_label_is_malformed_and_quotes_the_label() -> None:
    parsed = parse_request_line(_line(grants=["staff", "ops team!"]), line_no=5)

    assert isinstance(parsed, MalformedLine)
    assert "grants" in parsed.reason
    assert "ops team!" in parsed.reason


@pytest.mark.parametrize("deadline", [0, -1, -0.5])
def test_non_positive_deadline_is_malformed(deadline: float) -> None:
    parsed = parse_request_line(_line(deadline_s=deadline), line_no=1)

    assert isinstance(parsed, MalformedLine)
    assert "deadline_s" in parsed.reason


def test_grants_are_deduplicated_and_sorted() -> None:
    parsed = parse_request_line(_line(grants=["staff", "eng", "staff", "admin_ro"]), line_no=1)

    assert isinstance(parsed, RequestLine)
    assert parsed.grants == ["admin_ro", "eng", "staff"]


def test_custom_id_is_carried_into_malformed_line() -> None:
    # Given a line that names itself but breaks the contract
    raw = _line(custom_id="job-42", deadline_s=-5)

    # When it is parsed
    parsed = parse_request_line(raw, line_no=9)

    # Then the report still says which request it was
    assert isinstance(parsed, MalformedLine)
    assert parsed.custom_id == "job-42"
    assert parsed.line_no == 9


def test_non_string_custom_id_is_not_carried() -> None:
    parsed = parse_request_line(_line(custom_id=42), line_no=1)

    assert isinstance(parsed, MalformedLine)
    assert parsed.custom_id is None
    assert "custom_id" in parsed.reason


@pytest.mark.parametrize("declared", ["grounded_answer", "tool_lookup"])
def test_answer_request_may_declare_its_answer_class(declared: str) -> None:
    body = {"kind": "answer", "question": "What's the status of INC-2057?", "answer_class": declared}
    parsed = parse_request_line(_line(request=body), line_no=1)

    assert isinstance(parsed, RequestLine)
    assert isinstance(parsed.request, AnswerRequest)
    assert parsed.request.answer_class == declared


@pytest.mark.parametrize("declared", ["refuse", "clarify", "document", "weather"])
def test_declared_answer_class_is_limited_to_what_a_caller_may_ask_for(declared: str) -> None:
    body = {"kind": "answer", "question": "What's the status of INC-2057?", "answer_class": declared}
    parsed = parse_request_line(_line(request=body), line_no=3)

    assert isinstance(parsed, MalformedLine)
    assert parsed.reason.startswith("request.answer_class: ")


def test_answer_request_without_a_declared_class_leaves_it_to_the_router() -> None:
    parsed = parse_request_line(_line(), line_no=1)

    assert isinstance(parsed, RequestLine) and isinstance(parsed.request, AnswerRequest)
    assert parsed.request.answer_class is None


def test_every_line_of_the_example_job_files_still_parses_as_before() -> None:
    # The declared class is optional: job files written before it keep validating.
    jobs = Path(__file__).resolve().parents[2] / "ops" / "examples" / "jobs"
    for name, malformed_lines in (("small.jsonl", {6}), ("demo.jsonl", {8, 17})):
        lines = (jobs / name).read_text(encoding="utf-8").splitlines()
        parsed = [parse_request_line(raw, n) for n, raw in enumerate(lines, start=1)]
        assert {p.line_no for p in parsed if isinstance(p, MalformedLine)} == malformed_lines


@pytest.mark.parametrize(("request_body", "reason"), [
    ({"kind": "answer"}, "request.question: Field required"),
    ({"kind": "document", "template": "t", "topic": "x", "inputs": {"a": [1]}},
     "request.inputs: Value error, inputs['a'] must be a string, number or boolean, got list"),
    ({"kind": "document", "template": "t", "topic": "x", "inputs": {"a": float("nan")}},
     "request.inputs: Value error, inputs['a'] must be a finite number, got nan"),
    ({"kind": "document", "template": "t", "topic": "x", "inputs": {"a": "x" * 2001}},
     "request.inputs: Value error, inputs['a'] must be at most 2000 characters, got 2001"),
    ({"kind": "document", "template": "t", "topic": "x", "inputs": {"n" * 65: "v"}},
     "request.inputs: Value error, an input's name must be at most 64 characters, got one "
     "of 65"),
    ({"kind": "document", "template": "t", "topic": "x",
      "inputs": {f"k{i}": "v" for i in range(33)}},
     "request.inputs: Dictionary should have at most 32 items after validation, not more"),
])
def test_a_reason_names_the_field_as_the_line_does_once_per_problem(
        request_body: dict[str, object], reason: str) -> None:
    parsed = parse_request_line(_line(request=request_body), line_no=1)

    assert isinstance(parsed, MalformedLine)
    assert parsed.reason == reason


EDGE_LINES = [
    '{"custom_id": "a", "tenant": "t", "custom_id": "b", "request": {"kind": "answer", "question": "q"}}',
    '{"custom_id": "a", "tenant": "t", "deadline_s": "5", "request": {"kind": "answer", "question": "q"}}',
    '{"custom_id": "a", "tenant": "t", "deadline_s": NaN, "request": {"kind": "answer", "question": "q"}}',
    '{"custom_id": "a", "tenant": "t", "deadline_s": 1e400, "request": {"kind": "answer", "question": "q"}}',
    '{"custom_id": "a", "tenant": "t", "request": {"kind": "answer", "question": "caf\\u00e9 \\ud800"}}',
    '{"custom_id": "a", "tenant": "t", "grants": ["b", "a", "b"], "request": {"kind": "document", '
    '"template": "t", "topic": "x", "inputs": {"n": 1, "f": 1.5, "b": true, "s": "1"}}}',
    '{"custom_id": "a", "tenant": "t", "idempotency_key": 7, "request": {"kind": "answer", "question": "q"}}',
    '[1, 2]',
    '{"custom_id": "a", "tenant": "t", "deadline_s": 5, "request": {"kind": "answer", '
    '"question": "q"}, "deadline_s": -1}',
    '{"custom_id": "a", "tenant": "t", "request": {"kind": "document", "template": "t", '
    '"topic": "x", "kind": "answer"}}',
    '{"custom_id": "a", "tenant": "t", "request": {"kind": "document", "template": "t", '
    '"topic": "x", "inputs": {"n": ' + "9" * 5000 + '}}}',
    '{"custom_id": "a", "tenant": "t", "request": {"kind": "document", "template": "t", '
    '"topic": "x", "inputs": {"n": ' + "[" * 3000 + "]" * 3000 + '}}}',
    '{"custom_id": "a", "tenant": "t", "request": {"kind": "answer", "question": "q"}} trailing',
    '{"custom_id": "a", "tenant": "t", "request": {"kind": "document", "template": "t", '
    '"topic": "x", "inputs": {"n": NaN, "m": [1]}}}',
]


def test_the_one_pass_parse_agrees_with_json_loads_then_validate_on_every_line() -> None:
    """`parse_request_line` lets pydantic read the JSON itself and goes the long way
    (json.loads, then the dict) only for a line that fails. On every example job line and
    the edge cases (repeated keys, the last one invalid; numbers as text, NaN, overflow, an
    integer past Python's 4,300 digits, nesting past its recursion limit, escapes, lone
    surrogates, coercions, non-objects, trailing text), a line the long way accepts comes out
    the same request, and a line it rejects comes out malformed, never raised."""
    lines = list(EDGE_LINES)
    jobs = Path(__file__).resolve().parents[2] / "ops" / "examples" / "jobs"
    for path in sorted(jobs.glob("*.jsonl")):
        lines += [raw for raw in path.read_text(encoding="utf-8").splitlines() if raw.strip()]
    valid = 0
    for n, raw in enumerate(lines, 1):
        try:
            expected: RequestLine | None = RequestLine.model_validate(json.loads(raw))
        except (ValueError, TypeError, RecursionError):
            expected = None
        parsed = parse_request_line(raw, n)
        if expected is None:
            assert isinstance(parsed, MalformedLine), raw
        else:
            assert parsed == expected, raw
            valid += 1
    assert valid >= 20
