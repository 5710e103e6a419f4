"""Rendering a finished request's output for results.jsonl."""

from __future__ import annotations

import json

import pytest

from ops.jobs import render_output
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
