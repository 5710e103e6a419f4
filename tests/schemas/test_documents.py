"""Document models: one per template, small flat schemas, claims in the section bodies, and
the template contracts that validate generated JSON against them."""

from __future__ import annotations

import json

import pytest

from schemas.documents import (
    BODY_MAX_CHARS,
    DOCUMENT_MODELS,
    Document,
    IncidentSummary,
    PolicyBrief,
    UnknownTemplate,
    document_from_mapping,
    document_schema,
)
from tasks.files import TEMPLATES_PATH, load_yaml
from tasks.templates import load_templates
from tasks.validators.contract import ContractRegistry, json_object

pytestmark = [pytest.mark.unit]

INCIDENT = IncidentSummary(
    title="Duplicate invoices from billing-api",
    what_happened="Billing-api sent every invoice of 3 May twice [S1].",
    impact="About 1,200 customers received two invoices [S2].",
    root_cause="A retry after a timeout had no idempotency key [S1].",
    follow_ups="Add idempotency keys to invoice sends [S3].")


def test_every_template_names_a_model_and_every_model_serves_a_template() -> None:
    templates = load_templates()

    assert set(templates) == set(load_yaml(TEMPLATES_PATH))
    assert {t.model for t in templates.values()} == set(DOCUMENT_MODELS.values())
    assert templates["incident_summary"].model is IncidentSummary


@pytest.mark.parametrize("template", sorted(load_yaml(TEMPLATES_PATH)))
def test_a_document_schema_is_flat_bounded_and_small(template: str) -> None:
    schema = document_schema(template)

    properties = schema["properties"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert list(properties)[0] == "title" and schema["required"] == list(properties)
    assert "$defs" not in schema  # no nesting for a small model to get lost in
    assert all(p["type"] == "string" and 0 < p["maxLength"] <= BODY_MAX_CHARS
               for p in properties.values())
    assert len(json.dumps(schema, separators=(",", ":"))) < 800


def test_an_unknown_template_names_the_known_ones() -> None:
    with pytest.raises(UnknownTemplate, match="unknown template 'memo'; known: incident_summary"):
        document_schema("memo")


def test_a_document_round_trips_through_its_contract() -> None:
    contract = ContractRegistry.default().contracts["incident_summary"]

    parsed, reasons = contract.check(INCIDENT.model_dump_json())

    assert reasons == [] and parsed == INCIDENT
    assert contract.parse is json_object and contract.model is IncidentSummary


@pytest.mark.parametrize(("field", "body", "message"), [
    ("follow_ups", "Idempotency keys [S3].", "fewer than 3 words in 'Follow-ups' (2)"),
    ("follow_ups", "Idempotency-key-rollout [S3]", "fewer than 3 words in 'Follow-ups' (1)"),
    ("impact", "billing-api sent every invoice of 3 May twice. [S2]",
     "the same text in 'What happened' and 'Impact'"),
])
def test_a_section_is_a_statement_of_its_own(field: str, body: str, message: str) -> None:
    contract = ContractRegistry.default().contracts["incident_summary"]

    parsed, reasons = contract.check(INCIDENT.model_copy(update={field: body}).model_dump_json())

    assert parsed is None and [r.code for r in reasons] == ["invalid"]
    assert message in reasons[0].message


def test_numbers_are_words_and_every_offending_section_is_named_at_once() -> None:
    contract = ContractRegistry.default().contracts["incident_summary"]
    short = INCIDENT.model_copy(update={"impact": "Within 24 hours [S2].",
                                        "root_cause": "No idempotency [S1].",
                                        "follow_ups": "No idempotency."})

    parsed, [reason] = contract.check(short.model_dump_json())

    assert parsed is None
    assert "'Impact'" not in reason.message  # "Within 24 hours" is three words
    assert "fewer than 3 words in 'Root cause' (2), 'Follow-ups' (2)" in reason.message
    assert "the same text in 'Root cause' and 'Follow-ups'" in reason.message


def test_the_claims_are_the_section_bodies_in_order_and_headings_are_field_titles() -> None:
    document = INCIDENT.as_document()

    assert INCIDENT.claim_texts() == [s.body for s in document.sections]
    assert INCIDENT.title not in INCIDENT.claim_texts()
    assert [s.heading for s in document.sections] == [
        "What happened", "Impact", "Root cause", "Follow-ups"]
    assert document.claim_texts() == INCIDENT.claim_texts()


def test_a_mapping_becomes_a_document_by_its_shape() -> None:
    rendered = {"title": "On-call", "sections": [{"heading": "Pay", "body": "A stipend [S1]."}]}

    assert document_from_mapping(INCIDENT.model_dump()) == INCIDENT.as_document()
    assert document_from_mapping(rendered) == Document.model_validate(rendered)
    with pytest.raises(ValueError, match="fit no document model"):
        document_from_mapping({"title": "x", "summary": "y"})


def test_a_delivered_document_is_read_by_its_shape_not_judged_again() -> None:
    repeated = {**INCIDENT.model_dump(), "impact": "Invoices went out twice.",
                "follow_ups": " Invoices went out twice. "}
    with pytest.raises(ValueError, match="the same text in 'Impact' and 'Follow-ups'"):
        IncidentSummary.model_validate(repeated)

    document = IncidentSummary.delivered(repeated)

    assert isinstance(document, IncidentSummary)
    assert document.claim_texts()[1:] == ["Invoices went out twice.", INCIDENT.root_cause,
                                          "Invoices went out twice."]  # stripped, as checked
    assert IncidentSummary.delivered(INCIDENT.model_dump()) == INCIDENT
    for other in ({"title": "x"}, {**INCIDENT.model_dump(), "summary": "y"},
                  {**INCIDENT.model_dump(), "impact": 3}, [INCIDENT.model_dump()], "text"):
        assert IncidentSummary.delivered(other) is None


GOOD = PolicyBrief(title="Expense policy for new managers",
                   scope="The policy applies to every employee who spends company money [S1].",
                   rules="Receipts are required for every expense above $25 [S1].",
                   deadlines="Claims are filed within 30 days of the expense [S2].").model_dump()


@pytest.mark.parametrize(("draft", "code", "says"), [
    ("Scope: everyone [S1].", "parse_error", "not a valid policy_brief"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "rules"}), "invalid", "field 'rules'"),
    (json.dumps({**GOOD, "deadlines": "x" * (BODY_MAX_CHARS + 1)}), "invalid",
     f"at most {BODY_MAX_CHARS} characters"),
    (json.dumps({**GOOD, "summary": "An extra key [S1]."}), "invalid", "field 'summary'"),
    (json.dumps({**GOOD, "title": "  "}), "invalid", "field 'title'"),
    (json.dumps({**GOOD, "scope": "[S1] [S2] 42."}), "invalid", "no words"),
])
def test_the_contract_rejects_bad_documents_with_reasons(draft: str, code: str, says: str) -> None:
    contract = ContractRegistry.default().contracts["policy_brief"]

    parsed, reasons = contract.check(draft)

    assert parsed is None and reasons
    assert {r.code for r in reasons} == {code}
    assert any(says in r.message for r in reasons), [r.message for r in reasons]
