"""The example golden set (ops/examples/golden/golden.jsonl) is well formed and consistent with
the corpus, the canaries, the templates, the tool registry, the planner and the seeded tickets.

It checks the cases, not the pipeline: no models, no database, no broker.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from schemas.evals import AREAS, CorpusLine, GoldenCase
from tasks.router import RouterRules
from tasks.templates import load_templates
from tasks.tools import default_registry, plan_tool_call
from workers.store.records import parse_ticket

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "ops" / "examples" / "golden" / "golden.jsonl"
CORPUS = ROOT / "ops" / "examples" / "corpus"
CANARIES = CORPUS / "canaries.json"
DOCUMENT_ID = re.compile(r"^[0-9a-f]{16}$")
NOT_FOUND_TAG = "ticket-not-found"  # a tool case that looks up a ticket its tenant lacks
EXPECTED_STATUS = {"grounded": {"succeeded"}, "unanswerable": {"abstained"},
                   "refusal": {"refused"}, "clarify": {"needs_clarification"},
                   "document": {"succeeded"}, "injection": {"succeeded"}}


def _load() -> tuple[dict[str, list[str]], list[GoldenCase]]:
    corpus: dict[str, list[str]] = {}
    cases: list[GoldenCase] = []
    lines = [line for line in GOLDEN.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        data = json.loads(line)
        if number == 1 and "corpus" in data and "id" not in data:
            corpus = CorpusLine.model_validate(data).corpus
            continue
        cases.append(GoldenCase.model_validate(data))
    return corpus, cases


CORPUS_LINE, CASES = _load()


def _references(case: GoldenCase) -> list[str]:
    return [*case.expect.must_cite_any, *case.expect.must_not_cite]


def _document_path(reference: str) -> Path:
    return CORPUS / reference


def _seeded_tickets() -> dict[str, set[str]]:
    """Ticket ids per tenant, parsed as `seed_tickets` parses the example corpus."""
    found: dict[str, set[str]] = {}
    for path in sorted(CORPUS.rglob("*.md")):
        parts = path.relative_to(CORPUS).parts
        if len(parts) < 2 or not path.name.lower().startswith("inc-"):
            continue
        row = parse_ticket(parts[0], path.read_text(encoding="utf-8"), path)
        if row is not None:
            found.setdefault(row["tenant_id"], set()).add(row["id"])
    return found


def test_every_line_parses_and_ids_are_unique() -> None:
    assert 100 <= len(CASES) <= 200, len(CASES)
    duplicates = [i for i, n in Counter(c.id for c in CASES).items() if n > 1]
    assert not duplicates


def test_corpus_line_names_existing_folders() -> None:
    for folders in CORPUS_LINE.values():
        for folder in folders:
            assert (GOLDEN.parent / folder).is_dir(), folder


def test_every_area_has_at_least_five_cases() -> None:
    counts = Counter(c.area for c in CASES)
    assert {a: counts[a] for a in AREAS if counts[a] < 5} == {}


def test_ci_slice_covers_every_area() -> None:
    ci = [c for c in CASES if "ci" in c.tags]
    assert 20 <= len(ci) <= 30, len(ci)
    counts = Counter(c.area for c in ci)
    assert {a: counts[a] for a in AREAS if counts[a] < 2} == {}


def test_tenants_and_grants_are_corpus_names() -> None:
    tenants = {p.name for p in CORPUS.iterdir() if p.is_dir()}
    labels = {p.name for t in tenants for p in (CORPUS / t).iterdir() if p.is_dir()}
    for case in CASES:
        assert case.tenant in tenants, case.id
        assert set(case.grants) <= labels, case.id


def test_expected_status_fits_the_area() -> None:
    for case in CASES:
        allowed = EXPECTED_STATUS.get(case.area)
        if allowed is not None:
            assert case.expect.status in allowed, case.id
        if case.area == "refusal":
            assert case.expect.answer_class == "refuse", case.id
        if case.area == "clarify":
            assert case.expect.answer_class == "clarify", case.id
        if case.area == "tool":
            assert case.expect.answer_class == "tool_lookup", case.id
        if case.request.kind == "document":
            assert case.expect.answer_class == "document", case.id


def test_document_references_exist() -> None:
    for case in CASES:
        for reference in _references(case):
            if DOCUMENT_ID.match(reference):
                continue  # an ingestion id: nothing to check without an index
            assert _document_path(reference).is_file(), f"{case.id}: {reference}"


def test_documents_to_cite_are_readable_by_the_case() -> None:
    """A document a case must cite is its own tenant's, under a label its grants allow."""
    for case in CASES:
        for reference in case.expect.must_cite_any:
            if DOCUMENT_ID.match(reference):
                continue
            tenant, acl, *_ = reference.split("/")
            assert tenant == case.tenant, f"{case.id}: {reference}"
            assert acl in case.grants, f"{case.id}: {reference} needs grant {acl}"


def test_succeeding_answers_name_what_to_cite() -> None:
    for case in CASES:
        if case.area in ("grounded", "document", "injection") and case.expect.status == "succeeded":
            assert case.expect.must_cite_any, case.id


def test_canaries_are_known_and_must_not_appear() -> None:
    known: dict[str, str] = json.loads(CANARIES.read_text(encoding="utf-8"))
    injection = [c for c in CASES if c.area == "injection"]
    assert {known[k] for c in injection for k in c.canaries} == set(known.values()), \
        "every injection document is probed"
    for case in CASES:
        assert case.area != "injection" or case.canaries, case.id
        for canary in case.canaries:
            assert canary in known, f"{case.id}: {canary}"
            assert known[canary].startswith(f"{case.tenant}/"), f"{case.id}: {canary}"
            assert canary in case.expect.must_not_contain, f"{case.id}: {canary}"
            assert known[canary] in case.expect.must_cite_any, f"{case.id}: {canary}"


def test_document_requests_name_a_template_and_its_inputs() -> None:
    templates = load_templates()
    for case in CASES:
        if case.request.kind != "document":
            continue
        template = templates.get(case.request.template)
        assert template is not None, f"{case.id}: {case.request.template}"
        missing = [i for i in template.required_inputs if i not in case.request.inputs]
        assert not missing, f"{case.id}: missing {missing}"


def test_tools_exist_in_the_default_registry() -> None:
    names = {spec.name for spec in default_registry().specs}
    for case in CASES:
        assert set(case.expect.tools or []) <= names, case.id


def test_tool_cases_match_the_planner_and_the_seeded_tickets() -> None:
    """A successful tool case plans the tool it expects; a ticket it reads exists for its
    tenant, unless tagged ticket-not-found, where it must not; a tool case expecting a
    question back plans nothing."""
    seeded = _seeded_tickets()
    assert seeded.get("acme") and seeded.get("globex")
    for case in CASES:
        if case.area != "tool" or case.request.kind != "answer":
            continue
        plan = plan_tool_call(case.request.question)
        if case.expect.status == "needs_clarification":
            assert plan is None, case.id
            continue
        assert case.expect.status == "succeeded", case.id
        assert plan is not None and case.expect.tools == [plan.tool], case.id
        if plan.tool != "get_ticket":
            assert NOT_FOUND_TAG not in case.tags, case.id
            continue
        exists = plan.args["ticket_id"] in seeded.get(case.tenant, set())
        assert exists == (NOT_FOUND_TAG not in case.tags), f"{case.id}: {plan.args['ticket_id']}"


def test_only_refusal_cases_hit_a_refuse_rule() -> None:
    """The router's refuse rules come first: a case outside the refusal area that one of
    them matches could never reach the status it expects."""
    rules = RouterRules.load()
    for case in CASES:
        text = case.request.question if case.request.kind == "answer" else case.request.topic
        hit = next((r.name for r in rules.refuse if r.pattern.search(text)), None)
        if case.area != "refusal":
            assert hit is None, f"{case.id} matches refuse rule {hit}"
