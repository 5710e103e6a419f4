"""Reading job files line by line, and rendering a finished request's output for
results.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.jobs import parse_job_file, render_output
from schemas.documents import IncidentSummary
from tasks.render import SourceRef
from tasks.validators.contract import ContractRegistry
from workers.store.models import Request

pytestmark = [pytest.mark.unit]

SOURCES = {"c1": SourceRef("d1", "Postmortem", "acme/incidents/inc-2057.md")}
LABELS = {"S1": "c1"}
DOCUMENT = IncidentSummary(title="INC-2057", what_happened="Invoices went out twice [S1].",
                           impact="Customers were billed twice [S1].",
                           root_cause="A retry had no idempotency key [S1].",
                           follow_ups="Add idempotency keys [S1].").model_dump_json()


@pytest.mark.parametrize(("kind", "payload", "output", "starts"), [
    ("document", {"template": "incident_summary"}, DOCUMENT, "# INC-2057\n\n## What happened\n\n"),
    ("document", {"template": "incident_summary"}, "Invoices went out twice [S1].",
     "Invoices went out twice [1]."),  # not its contract: plain cited text
    ("answer", {"question": "q"}, DOCUMENT, '{"title":"INC-2057"'),
])
def test_a_document_that_fits_its_contract_renders_with_headings(
        kind: str, payload: dict[str, str], output: str, starts: str) -> None:
    request = Request(kind=kind, payload=payload, output=output)

    md = render_output(request, LABELS, SOURCES, ContractRegistry.default())

    assert md.startswith(starts)
    assert md.count("**Sources**") == 1


def test_a_delivered_document_renders_with_headings_under_a_stricter_contract() -> None:
    """A document accepted under an earlier contract (here: two sections with the same text,
    which contract-2 rejects) is exported again with its headings, not as plain JSON."""
    earlier = json.loads(DOCUMENT) | {"follow_ups": "Customers were billed twice [S1]."}
    request = Request(kind="document", payload={"template": "incident_summary"},
                      output=json.dumps(earlier))
    contracts = ContractRegistry.default()
    assert contracts.contracts["incident_summary"].check(request.output)[0] is None

    md = render_output(request, LABELS, SOURCES, contracts)

    assert md.startswith("# INC-2057\n\n## What happened\n\nInvoices went out twice [1].")
    assert md.count("Customers were billed twice [1].") == 2
    assert "## Follow-ups" in md


def test_a_delivered_document_renders_whatever_rule_it_breaks_now() -> None:
    """Shorter than a body may be today, too few words: still its own headings."""
    earlier = json.loads(DOCUMENT) | {"impact": "Twice."}
    request = Request(kind="document", payload={"template": "incident_summary"},
                      output=json.dumps(earlier))

    md = render_output(request, LABELS, SOURCES, ContractRegistry.default())

    assert "## Impact\n\nTwice.\n\n## Root cause" in md


def _request(custom_id: str, question: str = "How do I roll back?", **extra: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "tenant": "acme", "grants": ["public"],
                       "request": {"kind": "answer", "question": question}, **extra},
                      ensure_ascii=False).encode()


def test_a_job_file_is_read_by_newline_bytes_one_utf8_line_at_a_time(tmp_path: Path) -> None:
    latin1 = _request("latin", "caf\u00e9").replace("\u00e9".encode(), b"\xe9")
    path = tmp_path / "job.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _request("bom") + b"\r\n"  # a BOM, CRLF line ends
                     + _request("sep", "one\u2028two\u2029three\x85four") + b"\r\n"
                     + b"\n"  # blank: skipped
                     + latin1 + b"\n"
                     + _request("last"))  # no final newline

    parsed = parse_job_file(path)

    assert [line.custom_id for line in parsed.lines] == ["bom", "sep", "last"]
    assert parsed.line_numbers == [1, 2, 5]
    assert parsed.lines[1].request.question == "one\u2028two\u2029three\x85four"  # type: ignore[union-attr]
    (latin,) = parsed.malformed
    column = latin1.index(b"\xe9") + 1
    assert (latin.line_no, latin.reason) == (4, f"not UTF-8: byte 0xe9 at column {column}")


def test_a_repeated_key_of_one_tenant_is_malformed_and_another_tenants_is_not(
        tmp_path: Path) -> None:
    globex = json.loads(_request("g", idempotency_key="k"))
    globex["tenant"] = "globex"
    path = tmp_path / "job.jsonl"
    path.write_bytes(b"\n".join([_request("a", idempotency_key="k"), json.dumps(globex).encode(),
                                 _request("b", idempotency_key="k"), _request("a")]))

    parsed = parse_job_file(path)

    assert [line.custom_id for line in parsed.lines] == ["a", "g"]
    assert [(m.line_no, m.reason) for m in parsed.malformed] == [
        (3, "idempotency_key 'k' repeats line 1 of tenant 'acme'"),
        (4, "custom_id 'a' repeats an earlier line")]


def test_a_malformed_line_carries_only_a_valid_custom_id(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    path.write_bytes(b'{"custom_id": "\\ud800", "tenant": "acme"}\n'
                     + b'{"custom_id": "' + b"x" * 5000 + b'", "tenant": "acme"}\n'
                     + b'{"custom_id": "ok-1", "tenant": "acme"}\n')

    parsed = parse_job_file(path)

    assert [m.custom_id for m in parsed.malformed] == [None, None, "ok-1"]
