"""Each validator on crafted good and bad drafts, and the support threshold's calibration.

The support validator and the calibration use the real packaged MiniLM; nothing is mocked.
Evidence texts are chunks of the example corpus (ops/examples/corpus), as retrieval returns
them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from schemas.documents import BODY_MAX_CHARS
from schemas.stages import Attribution, ItemRecord, Outcome, ValidationItem, ValidationOutput, Verdict
from schemas.status import AnswerClass, Stage, Status
from tasks import adapters
from tasks.embedding import embedder_id
from tasks.indexing import split_markdown
from tasks.templates import load_templates
from tasks.validation import default_suite
from tasks.validators import (
    Contract,
    ContractRegistry,
    SupportCalibration,
    ValidatorRules,
    ValidatorSuite,
    json_object,
    markdown_sections,
)
from tasks.validators.calibration import (
    HOLDOUT_PATH,
    PAIRS_PATH,
    Scores,
    calibrate,
    choose_threshold,
    data_sha256,
    evaluate,
    load_pairs,
)
from tasks.validators.policy import check_policy
from tasks.validators.support import SCORER_VERSION, CalibrationError, SupportScorer
from tasks.validators.text import abstention_pattern, split_sentences

pytestmark = [pytest.mark.unit]

CORPUS = Path(__file__).resolve().parents[2] / "ops" / "examples" / "corpus"


def _chunk(document: str, heading: str) -> str:
    chunks = split_markdown((CORPUS / document).read_text(encoding="utf-8"))
    return next(c for c in chunks if c.splitlines()[0].lstrip("# ").strip() == heading)


ROTATION = _chunk("acme/engineering/on-call-policy.md", "Rotation")
COMPENSATION = _chunk("acme/engineering/on-call-policy.md", "Compensation")
ESCALATION = _chunk("acme/engineering/on-call-policy.md", "Escalation")
DRIVER_HELP = _chunk("acme/public/it-helpdesk-faq.md", "How do drivers get help with their tablet?")
EXPENSE_QUESTIONS = _chunk("acme/public/expense-policy.md", "Questions")
TEXTS = {"S1": ROTATION, "S2": COMPENSATION, "S3": ESCALATION}
LABELS = {"S1": "c-rotation", "S2": "c-compensation", "S3": "c-escalation"}


@pytest.fixture(scope="module")
def suite() -> ValidatorSuite:
    built = default_suite()
    built.warm_up()
    return built


def _item(draft: str, **fields: object) -> ValidationItem:
    values: dict[str, object] = {
        "request_id": "r1", "answer_class": AnswerClass.GROUNDED_ANSWER, "draft": draft,
        "source_labels": LABELS, "retrieved_chunk_ids": list(LABELS.values()), "chunk_texts": TEXTS}
    values.update(fields)
    return ValidationItem.model_validate(values)


def _judge(suite: ValidatorSuite, draft: str, **fields: object) -> Verdict:
    [verdict] = suite.judge([_item(draft, **fields)])
    return verdict


def _codes(verdict: Verdict) -> list[tuple[str, str, int | None]]:
    return [(f.validator, f.code, f.sentence) for f in verdict.findings]


# -- reading a draft ----------------------------------------------------------------------


ABSTAIN = ValidatorRules.load().abstention


def test_labels_after_the_full_stop_belong_to_the_sentence_before() -> None:
    sentences = split_sentences(["Handoff is on Monday. [S1] The stipend is $400 [S2][S3]. "
                                 "Dr. Lee agrees [S1]."], ABSTAIN)

    assert [(s.claim, s.labels) for s in sentences] == [
        ("Handoff is on Monday.", ("S1",)), ("The stipend is $400.", ("S2", "S3")),
        ("Dr. Lee agrees.", ("S1",))]


def test_headings_and_rules_are_not_claims_and_bullets_are_sentences() -> None:
    text = "# On-call\n\n## Rotation\n- Handoff is on Monday [S1].\n1. Paging uses PagerLoop [S1].\n---"

    sentences = split_sentences([text], ABSTAIN)

    assert [(s.index, s.claim) for s in sentences] == [
        (1, "Handoff is on Monday."), (2, "Paging uses PagerLoop.")]


def test_a_line_of_labels_or_a_sources_trailer_cites_for_the_sentence_before() -> None:
    sentences = split_sentences(["The stipend is $400.\n[S2]", "Paging uses PagerLoop.\n\n"
                                 "Sources: [S1], [S3]"], ABSTAIN)

    assert [(s.claim, s.labels) for s in sentences] == [
        ("The stipend is $400.", ("S2",)), ("Paging uses PagerLoop.", ("S1", "S3"))]


def test_a_heading_that_states_something_and_a_number_alone_are_claims() -> None:
    text = ("# The primary on-call stipend is $9,000 per week\n"
            "## Root passwords are shared in the team channel\n$9,000,000.\n"
            "## Step 2\n### 3. Approvals\n## What to do when the pager fires\n"
            "## Who is on call?")

    sentences = split_sentences([text], ABSTAIN)

    # Numbering, headings that only name a topic, and questions are not claims
    assert [s.claim for s in sentences] == [
        "The primary on-call stipend is $9,000 per week",
        "Root passwords are shared in the team channel", "$9,000,000."]


@pytest.mark.parametrize(("sentence", "abstains"), [
    ("I don't know.", True), ("There is not enough evidence to answer.", True),
    ("The sources do not contain this information.", True), ("Sorry, I cannot answer that.", True),
    ("I don't know the date, but the handoff is on Monday.", False),
    ("The handoff is on Monday.", False),
    ("I don't know who approves swaps, so they are approved by the CFO.", False),
    ("I cannot answer that fully; the primary on-call stipend is high.", False),
    ("I don't know the stipend for 2025.", True),
    ("There is not enough information about the 09:00 handoff.", True),
    ("I don't know, so I cannot answer.", True),
    ("I cannot answer: the sources do not mention it.", True),
])
def test_explicit_abstentions_are_recognised(sentence: str, abstains: bool) -> None:
    [parsed] = split_sentences([sentence], ABSTAIN)

    assert parsed.abstains is abstains


def test_an_abstention_needs_at_least_one_phrase() -> None:
    with pytest.raises(ValueError, match="at least one abstention phrase"):
        abstention_pattern([])


# -- contract -----------------------------------------------------------------------------


class Section(BaseModel):
    heading: str = Field(min_length=1)
    body: str = Field(min_length=1)


class IncidentBrief(BaseModel):
    """A small document model: a title and two to four sections; only bodies carry claims."""

    title: str = Field(min_length=1)
    sections: list[Section] = Field(min_length=2, max_length=4)

    def claim_texts(self) -> list[str]:
        return [s.body for s in self.sections]


def _with_brief(suite: ValidatorSuite) -> ValidatorSuite:
    contracts = ContractRegistry.default().register(
        Contract("incident_brief", IncidentBrief, markdown_sections), classes=["document"])
    return ValidatorSuite(suite.scorer, suite.calibration, suite.rules, contracts)


def test_a_document_that_fits_its_model_passes_and_its_headings_need_no_citation(
        suite: ValidatorSuite) -> None:
    draft = ("# On-call at Acme\n\n## Handoff\nThe on-call week starts with a handoff every Monday "
             "at 09:00 ET [S1].\n\n## Pay\nThe primary receives a stipend of $400 per week [S2].")

    verdict = _judge(_with_brief(suite), draft, answer_class=AnswerClass.DOCUMENT)

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons
    assert verdict.citations == ["c-rotation", "c-compensation"]


def test_a_document_missing_a_section_is_a_contract_violation(suite: ValidatorSuite) -> None:
    draft = "# On-call\n\n## Handoff\nThe on-call week starts with a handoff every Monday [S1]."

    verdict = _judge(_with_brief(suite), draft, answer_class=AnswerClass.DOCUMENT)

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "ContractViolation"
    assert _codes(verdict) == [("contract", "invalid", None)]
    assert "field 'sections'" in verdict.reasons[0]


def test_a_contract_named_on_the_item_wins_over_the_class_default(suite: ValidatorSuite) -> None:
    class Numbers(BaseModel):
        values: list[int]

    contracts = ContractRegistry.default().register(Contract("numbers", Numbers, json_object))
    custom = ValidatorSuite(suite.scorer, suite.calibration, suite.rules, contracts)

    bad = _judge(custom, '{"values": ["x"]}', contract="numbers", answer_class=AnswerClass.CLARIFY)
    unparsable = _judge(custom, "values: 1", contract="numbers", answer_class=AnswerClass.CLARIFY)
    unknown = _judge(custom, "Anything [S1].", contract="no-such-contract")

    assert _codes(bad) == [("contract", "invalid", None)]
    assert _codes(unparsable) == [("contract", "parse_error", None)]
    assert _codes(unknown) == [("contract", "unknown_contract", None)]
    assert "no-such-contract" in unknown.reasons[0]


def test_every_template_has_a_json_contract_named_after_it() -> None:
    registry = ContractRegistry.default()

    for name, template in load_templates().items():
        assert registry.contracts[name].model is template.model
        assert registry.contracts[name].parse is json_object
    assert registry.by_class["document"] == "answer"  # only for a document without a template


def _policy_brief(deadlines: str) -> str:
    return json.dumps({
        "title": "On-call at Acme",
        "scope": "The on-call week starts with a handoff every Monday at 09:00 ET [S1].",
        "rules": "The primary receives a stipend of $400 per week [S2].",
        "deadlines": deadlines})


def test_a_json_document_is_checked_per_section_body_and_its_title_needs_no_citation(
        suite: ValidatorSuite) -> None:
    # Given a policy brief whose bodies all cite retrieved sources
    good = _policy_brief("If the primary does not acknowledge a page within 10 minutes, "
                         "PagerLoop escalates to the secondary [S3].")
    # And one whose last body cites nothing
    uncited = _policy_brief("If the primary does not acknowledge a page within 10 minutes, "
                            "PagerLoop escalates to the secondary.")

    # When both are judged under the template's contract, by a suite that may not cite
    strict = ValidatorSuite(suite.scorer, suite.calibration,
                            replace(suite.rules, attribute_uncited=False), suite.contracts)
    passed = _judge(strict, good, answer_class=AnswerClass.DOCUMENT, contract="policy_brief")
    failed = _judge(strict, uncited, answer_class=AnswerClass.DOCUMENT, contract="policy_brief")

    # Then only the body's sentence is a claim that needs a citation
    assert passed.outcome.status == Status.SUCCEEDED, passed.reasons
    assert passed.citations == ["c-rotation", "c-compensation", "c-escalation"]
    assert _codes(failed) == [("citations", "missing_citation", 3)]


def test_the_validator_cites_an_uncited_section_body_inside_the_json(
        suite: ValidatorSuite) -> None:
    # Given a policy brief whose last body cites nothing, though a source supports it
    uncited = _policy_brief("If the primary does not acknowledge a page within 10 minutes, "
                            "PagerLoop escalates to the secondary.")

    # When the shipped suite judges it
    verdict = _judge(suite, uncited, answer_class=AnswerClass.DOCUMENT, contract="policy_brief")

    # Then the body is cited inside the JSON, which still parses, and the citation is listed
    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons
    assert json.loads(verdict.output)["deadlines"].endswith("to the secondary. [S3]")
    assert verdict.citations == ["c-rotation", "c-compensation", "c-escalation"]
    assert [(a.sentence, a.label, a.chunk_id) for a in verdict.attributions] == [
        (3, "S3", "c-escalation")]


def test_an_attributed_label_lands_in_the_body_not_in_a_title_that_repeats_it(
        suite: ValidatorSuite) -> None:
    # Given a policy brief titled with the very sentence its first body leaves uncited
    handoff = "The on-call week starts with a handoff every Monday at 09:00 ET."
    draft = json.dumps({
        "title": handoff, "scope": handoff,
        "rules": "The primary receives a stipend of $400 per week [S2].",
        "deadlines": "If the primary does not acknowledge a page within 10 minutes, "
                     "PagerLoop escalates to the secondary [S3]."})

    verdict = _judge(suite, draft, answer_class=AnswerClass.DOCUMENT, contract="policy_brief")

    # Then the label goes after the body's sentence, and the title stays as written
    released = json.loads(verdict.output)
    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons
    assert released["title"] == handoff
    assert released["scope"] == f"{handoff} [S1]"
    assert [(a.sentence, a.label) for a in verdict.attributions] == [(1, "S1")]


def test_a_document_that_repeats_one_supported_sentence_in_every_section_fails(
        suite: ValidatorSuite) -> None:
    # Given a policy brief whose three bodies are one cited, supported sentence (a small
    # model's way of filling a schema)
    sentence = "The on-call week starts with a handoff every Monday at 09:00 ET [S1]."
    draft = json.dumps({"title": "On-call at Acme", "scope": sentence, "rules": sentence,
                        "deadlines": sentence.replace("[S1]", "")})

    # When the shipped suite judges it
    verdict = _judge(suite, draft, answer_class=AnswerClass.DOCUMENT, contract="policy_brief")

    # Then the contract refuses it, naming every repeat, before any sentence is checked
    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "ContractViolation"
    assert _codes(verdict) == [("contract", "invalid", None)]
    assert "the same text in 'Scope', 'Rules' and 'Deadlines'" in verdict.reasons[0]


def test_a_document_whose_sections_are_names_fails(suite: ValidatorSuite) -> None:
    # Given a runbook brief whose bodies are a name, a cited name and a heading
    draft = json.dumps({"title": "Route planner", "purpose": "Runbook-route-planner",
                        "health_checks": "Health-check [S1]", "first_steps": "First steps."})

    # When the shipped suite judges it
    verdict = _judge(suite, draft, answer_class=AnswerClass.DOCUMENT, contract="runbook_brief")

    # Then the contract fails it, naming each section
    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "ContractViolation"
    assert ("fewer than 3 words in 'Purpose' (1), 'Health checks' (1), "
            "'First steps when it fails' (2)") in verdict.reasons[0]


def test_a_markdown_document_fails_its_json_contract(suite: ValidatorSuite) -> None:
    draft = "# On-call\n\n## Scope\nThe on-call week starts with a handoff every Monday [S1]."

    verdict = _judge(suite, draft, answer_class=AnswerClass.DOCUMENT, contract="policy_brief")

    assert verdict.outcome.error_class == "ContractViolation"
    assert _codes(verdict) == [("contract", "parse_error", None)]


def test_the_contracts_version_changes_with_a_model() -> None:
    base = ContractRegistry.default().version
    extended = ContractRegistry.default().register(
        Contract("incident_brief", IncidentBrief, markdown_sections), classes=["document"]).version

    assert base.startswith("contract-2:") and extended != base
    assert ContractRegistry.default().version == base


def test_markdown_sections_reads_title_and_sections() -> None:
    parsed = markdown_sections("# T\n\nintro\n\n## A\nbody a\n\n## B\nbody b")

    assert parsed == {"title": "T", "sections": [
        {"heading": "", "body": "intro"}, {"heading": "A", "body": "body a"},
        {"heading": "B", "body": "body b"}]}


# -- citations ----------------------------------------------------------------------------


def test_a_cited_abstention_sentence_is_fine_next_to_cited_claims(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "The on-call week starts with a handoff every Monday at 09:00 ET [S1]. "
                            "I don't know how long the handoff call lasts.")

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons


def test_unknown_and_unretrieved_labels_are_reasons_per_sentence(suite: ValidatorSuite) -> None:
    labels = {**LABELS, "S4": "c-never-retrieved"}
    verdict = _judge(suite, "Paging is done through PagerLoop [S1]. The primary is paid $400 per "
                            "week [S4]. The secondary gets $200 [S7].", source_labels=labels)

    assert verdict.outcome.error_class == "UnknownCitation"
    assert _codes(verdict) == [("citations", "not_retrieved", 2), ("citations", "unknown_label", 3)]
    assert "[S7], which is not one of the sources (sources: [S1], [S2], [S3], [S4])" in verdict.reasons[1]
    assert verdict.citations == ["c-rotation"]


# -- support ------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", [
    "The on-call week does not start with a handoff every Monday at 09:00 ET [S1].",
    "Paging is not done through PagerLoop [S1].",
])
def test_a_near_verbatim_sentence_that_negates_its_source_contradicts_it(
        suite: ValidatorSuite, draft: str) -> None:
    verdict = _judge(suite, draft)

    assert verdict.outcome.status == Status.FAILED
    assert _codes(verdict) == [("support", "contradicts_source", 1)]


def test_faithful_paraphrases_are_supported(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "Each week starts with an on-call handoff on Monday at 09:00 ET [S1]. "
                            "The secondary on call receives $200 per week [S2]. A page the "
                            "primary does not acknowledge within 10 minutes goes to the secondary "
                            "[S3].")

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons


def test_a_sentence_may_combine_the_sources_it_cites(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "Paging goes through PagerLoop, and the primary's stipend is $400 per "
                            "week [S1][S2].")

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons


def test_a_wrong_number_is_named_in_the_reason(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "Paging is done through PagerLoop [S1]. The primary on call receives a "
                            "stipend of $450 per week [S2].")

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "UnsupportedClaim"
    assert _codes(verdict) == [("support", "number_not_in_source", 2)]
    assert re.match(r'Sentence 2 "The primary on call .*" is not supported by \[S2\]: \$450 does '
                    r'not appear there', verdict.reasons[0])


def test_a_wrong_name_is_named_in_the_reason(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "Paging is done through Beacon [S1].")

    assert _codes(verdict) == [("support", "name_not_in_source", 1)]
    assert "it names Beacon, which the source does not mention" in verdict.reasons[0]


@pytest.mark.parametrize("draft", [
    "Swaps must be approved by the engineering manager [S1].",
    "Unacknowledged pages escalate straight to the VP of Engineering [S3].",
])
def test_contradictions_and_inventions_fail_support(suite: ValidatorSuite, draft: str) -> None:
    verdict = _judge(suite, draft, chunk_texts={**TEXTS, "S1": _chunk(
        "acme/engineering/on-call-policy.md", "Swaps")})

    assert verdict.outcome.status == Status.FAILED
    assert [f.validator for f in verdict.findings if f.validator != "abstention"] == ["support"]


def test_a_cited_source_without_text_cannot_pass(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "Paging is done through PagerLoop [S1].", chunk_texts={})

    assert _codes(verdict) == [("support", "missing_source_text", 1)]


# -- policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(("draft", "code"), [
    ("Drivers can call 614-555-0123 at any time [S1].", "pii_phone"),
    ("Write to jane.doe@example.com for help [S1].", "pii_email"),
    ("Her SSN is 123-45-6789 [S1].", "pii_national_id"),
    ("Send the form to 1200 Harbor Street, Columbus [S1].", "pii_postal_address"),
])
def test_personal_data_not_in_the_evidence_is_a_policy_violation(
        suite: ValidatorSuite, draft: str, code: str) -> None:
    verdict = _judge(suite, draft, chunk_texts={"S1": DRIVER_HELP})

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "PolicyViolation"
    assert ("policy", code, None) in _codes(verdict)
    assert not re.search(r"614-555|jane\.doe|123-45|1200 Harbor", " ".join(verdict.reasons))  # masked
    assert verdict.output == ""  # a failed draft is not released


def test_a_credentials_secret_is_masked_in_every_reason_and_never_released(
        suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "The primary receives a stipend of $400 per week [S2]. "
                            "password: hunter2hunter2 [S2].")

    assert verdict.outcome.error_class == "PolicyViolation"
    assert ("policy", "denied_term", None) in _codes(verdict)
    assert "hunter2" not in " ".join(verdict.reasons) and verdict.output == ""


def test_personal_data_that_is_in_the_evidence_may_be_repeated(suite: ValidatorSuite) -> None:
    texts = {"S1": DRIVER_HELP, "S2": EXPENSE_QUESTIONS}
    verdict = _judge(suite, "Drivers call the driver support line at +1 555 0177, available 24/7 "
                            "[S1]. Finance questions go to finance@acmefreight.example [S2].",
                     chunk_texts=texts)

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons


@pytest.mark.parametrize("text", [
    "INC-2057 ran on 2024-05-03 from 02:05 to 06:15 ET.", "Budgets for 2020 2024 are closed.",
    "Nobody is on call for more than 2 weeks in any way.", "Port 8081 serves 1,312 requests.",
])
def test_dates_counts_and_identifiers_are_not_personal_data(text: str) -> None:
    assert check_policy(text, [], ValidatorRules.load()).reasons == []


def test_the_deny_list_is_configurable(suite: ValidatorSuite) -> None:
    data = {"abstention_phrases": ["i don't know"],
            "policy": {"deny": [{"pattern": r"\bproject bluebird\b", "why": "a confidential name"}]}}
    custom = ValidatorSuite(suite.scorer, suite.calibration, ValidatorRules.from_mapping(data))

    verdict = _judge(custom, "Paging is done through PagerLoop for Project Bluebird [S1].")
    canary = _judge(suite, "Paging is done through PagerLoop [S1]. CANARY-0935d172")

    assert ("policy", "denied_term", None) in _codes(verdict)
    assert "a confidential name" in verdict.reasons[0]
    assert ("policy", "denied_term", None) in _codes(canary)


def test_the_refuse_class_never_has_output_text(suite: ValidatorSuite) -> None:
    with_text = _judge(suite, "Here is what you asked for [S1].", answer_class=AnswerClass.REFUSE)
    empty = _judge(suite, "", answer_class=AnswerClass.REFUSE)

    assert with_text.outcome.status == Status.FAILED
    assert _codes(with_text) == [("policy", "output_forbidden", None)]
    assert with_text.output == ""
    assert empty.outcome.status == Status.REFUSED


def test_a_clarifying_question_needs_no_citation(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "Which team's on-call rotation do you mean?",
                     answer_class=AnswerClass.CLARIFY)

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons


# -- abstention ---------------------------------------------------------------------------


def test_no_evidence_means_abstained_whatever_the_draft_asserts(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "The handoff is on Friday [S1].", source_labels={},
                     retrieved_chunk_ids=[], chunk_texts={})

    assert verdict.outcome.status == Status.ABSTAINED
    assert verdict.outcome.error_class == "NoEvidence"
    assert verdict.output == "I don't know."


def test_an_explicit_abstention_on_weak_evidence_counts_as_correct(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "There is not enough evidence in the sources to answer this.")

    assert verdict.outcome.status == Status.ABSTAINED
    assert verdict.outcome.error_class == "ModelAbstained"


def test_asserting_on_weak_evidence_fails_and_asks_for_the_abstention(suite: ValidatorSuite) -> None:
    # Given sources about on-call, and an answer about something they do not cover
    verdict = _judge(suite, "The cafeteria serves lunch from noon until 14:00 [S1]. Parking "
                            "permits cost $40 a month [S2].")

    # Then the draft fails, first of all because it should have abstained
    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "WeakEvidence"
    assert verdict.reasons[0].endswith("reply exactly: I don't know.")
    assert {f.code for f in verdict.findings[1:]} <= {"number_not_in_source", "unsupported",
                                                      "name_not_in_source"}


def test_a_wrong_detail_on_strong_evidence_is_not_weak_evidence(suite: ValidatorSuite) -> None:
    verdict = _judge(suite, "The on-call week starts with a handoff every Monday at 10:00 ET [S1].")

    assert verdict.outcome.error_class == "UnsupportedClaim"
    assert "abstention" not in {f.validator for f in verdict.findings}


# -- versions and the adapter ---------------------------------------------------------------


def test_the_version_names_every_validator_threshold_and_data(suite: ValidatorSuite) -> None:
    calibration = suite.calibration

    assert list(suite.versions) == ["contract", "policy", "citations", "support", "abstention"]
    assert suite.versions["support"] == (
        f"{SCORER_VERSION}:t{calibration.threshold:.3f}:a{calibration.attribution_threshold:.3f}:"
        f"d{calibration.data_sha256[:8]}:{calibration.embedder}")
    assert all(v in suite.version for v in suite.versions.values())


def test_a_body_the_citation_would_push_over_its_limit_is_left_uncited(
        suite: ValidatorSuite) -> None:
    # Given a policy brief whose last body cites nothing and has room for no label
    sentence = ("If the primary does not acknowledge a page within 10 minutes, PagerLoop "
                "escalates to the secondary.")
    body = ("The outgoing primary hands over in a 15-minute call with the incoming primary [S1]. "
            f"Nobody is on call for more than 2 weeks in a row [S1]. {sentence}")
    assert BODY_MAX_CHARS - len(" [S3]") < len(body) <= BODY_MAX_CHARS

    # When it is judged
    verdict = _judge(suite, _policy_brief(body), answer_class=AnswerClass.DOCUMENT,
                     contract="policy_brief")

    # Then the validator cites nothing rather than release a brief that breaks its contract
    assert verdict.attributions == []
    assert ("citations", "missing_citation", 5) in _codes(verdict)
    assert verdict.outcome.status == Status.FAILED and verdict.output == ""


def test_the_verdict_event_records_each_attribution() -> None:
    attribution = Attribution(sentence=1, label="S2", chunk_id="c2", score=0.8)
    verdict = Verdict(request_id="r1", validator_version="v", output="x. [S2]", citations=["c2"],
                      reasons=[], outcome=Outcome(status=Status.SUCCEEDED),
                      attributions=[attribution])
    record = ItemRecord(request_id="r1", tenant="acme", grants=["public"], kind="answer",
                        payload={}, previous={Stage.GENERATION: {"text": "x."}})

    _, [event] = adapters.validation_results(ValidationOutput(verdicts=[verdict]), [record])

    assert event.payload["attributions"] == [
        {"sentence": 1, "label": "S2", "chunk_id": "c2", "score": 0.8}]


def test_validation_input_gives_each_label_its_chunk_text() -> None:
    chunks = [{"chunk_id": cid, "document_id": "d", "title": "t", "text": f"text of {cid}",
               "score": 1.0} for cid in ("c1", "c2")]
    record = ItemRecord(request_id="r1", tenant="acme", grants=["public"], kind="answer", payload={},
                        previous={Stage.ROUTER: {"answer_class": "grounded_answer"},
                                  Stage.RETRIEVAL: {"chunks": chunks},
                                  Stage.GENERATION: {"text": "x [S1]",
                                                     "source_labels": {"S1": "c1", "S2": "c2"}}})

    [item] = adapters.validation_input([record]).items

    assert item.chunk_texts == {"S1": "text of c1", "S2": "text of c2"}


@pytest.mark.parametrize(("kind", "payload", "contract"), [
    ("document", {"template": "runbook_brief", "topic": "t", "inputs": {"service": "s"}},
     "runbook_brief"),
    ("answer", {"question": "q"}, None),
])
def test_validation_input_names_a_documents_template_contract(kind: str, payload: dict[str, object],
                                                              contract: str | None) -> None:
    record = ItemRecord(request_id="r1", tenant="acme", grants=["public"], kind=kind,
                        payload=payload,
                        previous={Stage.ROUTER: {"answer_class": "grounded_answer"},
                                  Stage.RETRIEVAL: {"chunks": []}, Stage.GENERATION: {"text": "x"}})

    [item] = adapters.validation_input([record]).items

    assert item.contract == contract


# -- calibration --------------------------------------------------------------------------


def test_the_labelled_pairs_come_from_the_corpus_and_cover_both_labels() -> None:
    pairs = load_pairs(PAIRS_PATH)
    rows = [json.loads(line) for line in PAIRS_PATH.read_text(encoding="utf-8").splitlines()]

    assert len(pairs) >= 80
    assert {p.supported for p in pairs} == {True, False}
    assert {p.kind for p in pairs if not p.supported} == {
        "wrong_number", "wrong_entity", "unrelated", "contradiction"}
    for row in rows:  # each evidence text is a chunk of its document, as ingestion cuts it
        assert row["evidence"] in split_markdown((CORPUS / row["source"]).read_text(encoding="utf-8"))


def test_the_committed_calibration_is_for_this_data_scorer_and_embedder(suite: ValidatorSuite) -> None:
    calibration = SupportCalibration.load()

    assert calibration.data_sha256 == data_sha256(PAIRS_PATH), "run `sluice validators calibrate`"
    assert calibration.scorer == SCORER_VERSION
    assert calibration.embedder == embedder_id(suite.scorer.embedder.model_path)
    assert calibration.pairs == len(load_pairs(PAIRS_PATH))


def test_calibration_reaches_its_precision_and_recall(suite: ValidatorSuite) -> None:
    report = calibrate(load_pairs(PAIRS_PATH), suite.scorer, data_sha256(PAIRS_PATH))
    held_out = evaluate(load_pairs(HOLDOUT_PATH), suite.scorer, report.calibration.threshold)
    c = report.calibration
    print(f"\nsupport threshold {c.threshold:.4f}: precision {c.precision:.3f} recall {c.recall:.3f}"
          f"; cross-validated {c.cv_precision:.3f}/{c.cv_recall:.3f}; held out "
          f"{held_out.confusion.precision:.3f}/{held_out.confusion.recall:.3f}")

    assert c.threshold == SupportCalibration.load().threshold  # the committed file is current
    assert c.attribution_threshold == SupportCalibration.load().attribution_threshold
    assert c.attribution_threshold is not None and c.attribution_threshold > c.threshold
    assert c.attribution_cv_precision is not None and c.attribution_cv_precision > c.cv_precision  # type: ignore[operator]
    stricter = evaluate(load_pairs(HOLDOUT_PATH), suite.scorer, c.attribution_threshold)
    assert stricter.confusion.precision >= held_out.confusion.precision
    assert c.precision >= 0.8 and c.recall >= 0.7
    assert c.cv_precision is not None and c.cv_precision >= 0.8
    assert c.cv_recall is not None and c.cv_recall >= 0.7
    assert held_out.confusion.precision >= 0.8 and held_out.confusion.recall >= 0.7


def test_rules_that_attribute_need_a_calibrated_attribution_threshold(suite: ValidatorSuite) -> None:
    bare = replace(suite.calibration, attribution_threshold=None)

    with pytest.raises(CalibrationError, match="attribution threshold"):
        ValidatorSuite(suite.scorer, bare, suite.rules)
    ValidatorSuite(suite.scorer, bare, replace(suite.rules, attribute_uncited=False))


def test_cached_evidence_scores_as_freshly_read_evidence_and_its_cache_stays_bounded(
        suite: ValidatorSuite) -> None:
    pairs = [(p.sentence, p.evidence) for p in load_pairs(PAIRS_PATH)]
    evidence = {e for _, e in pairs}
    # Text vectors stay cached (a text embedded in another batch may differ in the last
    # digits); the evidence kept is capped at 3.
    fresh = SupportScorer(suite.scorer.embedder, evidence_cache_size=3)

    first = fresh.assess_many(pairs)  # one batch: every evidence read fresh
    again = fresh.assess_many(pairs[::-1])[::-1]  # and read from the cache
    one_by_one = [fresh.assess_many([pair])[0] for pair in pairs]  # a tiny cache, reused

    assert len(evidence) > 3 and len(fresh._evidence) == 3
    assert first == again == one_by_one


def test_scores_alone_are_the_scores_of_full_assessments(suite: ValidatorSuite) -> None:
    """`scores_many` (the weak-evidence check) skips the search for missing specifics, not
    any part of the score: on every labelled pair, and on evidence with no text, it gives
    what `assess_many` does."""
    pairs = [(p.sentence, p.evidence) for p in load_pairs(PAIRS_PATH)]
    pairs += [("Refunds take 12 weeks.", ""), ("Refunds take 12 weeks.", "## Heading only")]

    scores = suite.scorer.scores_many(pairs)

    assert scores == [a.score for a in suite.scorer.assess_many(pairs)]
    assert len(set(scores)) > 10 and scores[-2:] == [0.0, 0.0]


def test_a_target_precision_picks_the_lowest_threshold_reaching_it() -> None:
    import numpy as np

    scores = Scores(score=np.array([0.9, 0.8, 0.7, 0.6, 0.5]),
                    gated=np.array([False] * 5),
                    supported=np.array([True, True, False, True, False]))

    assert choose_threshold(scores, target_precision=1.0) == 0.75
    assert choose_threshold(scores) == 0.55  # best F1: accept the first four


def test_the_calibrate_command_prints_figures_and_writes_the_file(tmp_path: Path,
                                                                  suite: ValidatorSuite) -> None:
    from ops.validators_cli import validators_app

    small = tmp_path / "pairs.jsonl"
    small.write_text("".join(line + "\n" for line in PAIRS_PATH.read_text(
        encoding="utf-8").splitlines()[:20]), encoding="utf-8")
    target = tmp_path / "calibration.yaml"

    result = CliRunner().invoke(validators_app, ["calibrate", "--pairs", str(small), "--holdout",
                                                 str(tmp_path / "none.jsonl"), "--out", str(target)],
                                terminal_width=200)

    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "recall" in result.output
    written = SupportCalibration.load(target)
    assert f"support threshold {written.threshold:.4f}" in result.output
    assert written.data_sha256 == data_sha256(small) and written.pairs == 20


def test_a_suite_refuses_an_embedder_the_threshold_was_not_calibrated_with(tmp_path: Path) -> None:
    from tasks.embedding import Embedder
    from tasks.validators import CalibrationError

    with pytest.raises(CalibrationError, match="calibrated with embedder"):
        ValidatorSuite.load(Embedder(str(tmp_path / "another-model")))


def test_a_stale_or_missing_calibration_is_refused(tmp_path: Path) -> None:
    from tasks.validators import CalibrationError

    stale = tmp_path / "stale.yaml"
    stale.write_text("threshold: 0.5\ndata_sha256: ab\nembedder: x\npairs: 1\nprecision: 1\n"
                     "recall: 1\nscorer: support-scorer-0\n", encoding="utf-8")

    with pytest.raises(CalibrationError, match="support-scorer-0"):
        SupportCalibration.load(stale)
    with pytest.raises(CalibrationError, match="no support calibration"):
        SupportCalibration.load(tmp_path / "missing.yaml")


def test_a_record_id_neither_held_nor_sourced_is_refused_without_naming_a_tenant() -> None:
    from tasks.validators.policy import record_identifiers

    text = "INC-2057 was caused by a retry storm; INC-3125 was similar [S1]."

    findings = check_policy(text, [], ValidatorRules.load(), unheld=["INC-3125"])
    sourced = check_policy(text, ["The ticket system has no ticket INC-3125."],
                           ValidatorRules.load(), unheld=["INC-3125"])

    assert record_identifiers(text) == ["INC-2057", "INC-3125"]
    assert [r.code for r in findings.reasons] == ["unknown_record"]
    assert "INC-3125" in findings.reasons[0].message
    assert "globex" not in findings.reasons[0].message
    assert sourced.reasons == []  # its sources name it
    assert check_policy(text, [], ValidatorRules.load()).reasons == []
    # A source naming INC-31250 does not name INC-3125
    assert [r.code for r in check_policy(text, ["See INC-31250."], ValidatorRules.load(),
                                         unheld=["INC-3125"]).reasons] == ["unknown_record"]


def test_only_ticket_ids_the_request_did_not_ask_about_are_looked_up() -> None:
    from schemas.stages import ItemRecord
    from tasks.queue_tasks import _ticket_ids_added

    record = ItemRecord(request_id="r", tenant="acme", grants=["public"], kind="answer",
                        payload={"kind": "answer", "question": "Is INC-3125 resolved?"},
                        previous={"generation": {"text": "SHA-256 sums of COVID-19 data: "
                                                         "INC-3125 is unknown; see INC-2999."}})

    assert _ticket_ids_added(record) == ["INC-2999"]
