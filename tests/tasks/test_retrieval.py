"""The retrieval stage on the real packaged embedder and a tiny FAISS index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.stages import RetrievalInput, RetrievalItem, RetrievalResult
from schemas.status import Status
from tasks.embedding import Embedder
from tasks.indexing import ChunkRecord, chunk_id, document_id, index_id, write_index
from tasks.retrieval import Retriever
from workers.settings import _packaged_embedder_path

pytestmark = [pytest.mark.unit]

EMBEDDER_ID = "all-minilm-l6-v2-test"


@dataclass(frozen=True)
class Doc:
    tenant: str
    path: str
    acl: list[str]
    title: str
    text: str


DOCS = [
    Doc("acme", "it/laptops.md", ["staff"], "Laptops",
        "To request a new laptop computer, open a hardware ticket in the IT portal. "
        "Laptops are replaced every three years."),
    Doc("acme", "finance/expenses.md", ["finance"], "Expenses",
        "Travel expenses are reimbursed within thirty days after you upload the receipts "
        "for hotels, flights and meals."),
    Doc("acme", "it/vpn.md", ["staff"], "VPN",
        "Connect to the corporate VPN with the WireGuard client and your hardware security key."),
    Doc("globex", "it/laptops.md", ["staff"], "Laptops",
        "Globex laptop computers are ordered by your manager from the hardware catalogue."),
    Doc("globex", "hr/leave.md", ["hr"], "Parental leave",
        "Parents get sixteen weeks of paid parental leave after the birth or adoption of a child."),
    Doc("globex", "facilities/cafeteria.md", ["staff"], "Cafeteria",
        "The cafeteria serves lunch from noon to two, with a vegetarian menu every day."),
]


def _record(doc: Doc) -> ChunkRecord:
    doc_id = document_id(doc.tenant, doc.path)
    return ChunkRecord(chunk_id=chunk_id(doc_id, 0, doc.text), document_id=doc_id,
                       tenant=doc.tenant, acl=doc.acl, title=doc.title, ordinal=0, text=doc.text)


RECORDS = [_record(d) for d in DOCS]
BY_KEY = {(d.tenant, d.path): r for d, r in zip(DOCS, RECORDS, strict=True)}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    import torch

    torch.set_num_threads(1)  # the machine is shared; one thread is plenty for six chunks
    model = Embedder(_packaged_embedder_path())
    model.warm_up()
    return model


@pytest.fixture(scope="module")
def retriever(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    folder: Path = tmp_path_factory.mktemp("index")
    vectors = embedder.encode([r.text for r in RECORDS])
    write_index(folder, vectors, RECORDS)
    idx = index_id([r.chunk_id for r in RECORDS], EMBEDDER_ID, {"metric": "ip"})
    return Retriever(embedder, folder, idx)


def _retrieve_one(retriever: Retriever, tenant: str, grants: list[str], query: str,
                  top_k: int = 10) -> RetrievalResult:
    batch = RetrievalInput(top_k=top_k, items=[
        RetrievalItem(request_id="r1", tenant=tenant, grants=grants, query=query)])
    results = retriever.retrieve(batch).results
    assert len(results) == 1
    assert results[0].request_id == "r1"
    assert results[0].index_id == retriever.index_id
    return results[0]


def _readable(tenant: str, grants: list[str]) -> set[str]:
    return {r.chunk_id for r in RECORDS if r.tenant == tenant and set(grants) & set(r.acl)}


def test_results_only_contain_the_request_tenant(retriever: Retriever) -> None:
    # Given both tenants hold a laptop document
    # When acme asks about laptops with every label acme uses
    result = _retrieve_one(retriever, "acme", ["staff", "finance", "hr"], "how do I get a laptop")

    # Then every chunk returned is acme's, and all of acme's readable chunks are returned
    ids = {c.chunk_id for c in result.chunks}
    acme_ids = {r.chunk_id for r in RECORDS if r.tenant == "acme"}
    assert ids == acme_ids
    assert BY_KEY[("globex", "it/laptops.md")].chunk_id not in ids
    assert result.outcome is None


def test_other_tenant_sees_only_its_own_chunks(retriever: Retriever) -> None:
    result = _retrieve_one(retriever, "globex", ["staff", "hr"], "how do I get a laptop")

    assert {c.chunk_id for c in result.chunks} == _readable("globex", ["staff", "hr"])
    assert result.chunks[0].chunk_id == BY_KEY[("globex", "it/laptops.md")].chunk_id


def test_grants_restrict_to_matching_acl_labels(retriever: Retriever) -> None:
    # Given a staff member without the finance label
    # When they ask a finance question
    result = _retrieve_one(retriever, "acme", ["staff"], "how are travel expenses reimbursed")

    # Then the finance chunk is not returned, however relevant it is
    ids = {c.chunk_id for c in result.chunks}
    assert ids == _readable("acme", ["staff"])
    assert BY_KEY[("acme", "finance/expenses.md")].chunk_id not in ids


def test_finance_grant_reads_only_finance_chunks(retriever: Retriever) -> None:
    result = _retrieve_one(retriever, "acme", ["finance"], "laptop")

    assert [c.chunk_id for c in result.chunks] == [BY_KEY[("acme", "finance/expenses.md")].chunk_id]


@pytest.mark.parametrize("query,key", [
    ("How do I request a new laptop?", ("acme", "it/laptops.md")),
    ("When will my hotel and flight receipts be reimbursed?", ("acme", "finance/expenses.md")),
    ("How do I connect to the VPN from home?", ("acme", "it/vpn.md")),
])
def test_query_about_a_topic_ranks_that_chunk_first(retriever: Retriever, query: str,
                                                    key: tuple[str, str]) -> None:
    result = _retrieve_one(retriever, "acme", ["staff", "finance"], query)

    assert result.chunks[0].chunk_id == BY_KEY[key].chunk_id
    scores = [c.score for c in result.chunks]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > scores[-1]


def test_top_k_limits_the_number_of_chunks(retriever: Retriever) -> None:
    result = _retrieve_one(retriever, "acme", ["staff", "finance"], "laptop", top_k=1)

    assert [c.chunk_id for c in result.chunks] == [BY_KEY[("acme", "it/laptops.md")].chunk_id]


@pytest.mark.parametrize("tenant,grants", [
    ("initech", ["staff"]),   # a tenant with no documents at all
    ("acme", ["hr"]),         # a label only another tenant uses
    ("acme", []),             # no grants at all
])
def test_nothing_readable_is_abstained_no_evidence(retriever: Retriever, tenant: str,
                                                   grants: list[str]) -> None:
    result = _retrieve_one(retriever, tenant, grants, "How do I request a new laptop?")

    assert result.chunks == []
    assert result.outcome is not None
    assert result.outcome.status == Status.ABSTAINED
    assert result.outcome.error_class == "NoEvidence"
    assert tenant in result.outcome.message


def test_returned_chunks_carry_the_stable_ids_written(retriever: Retriever) -> None:
    result = _retrieve_one(retriever, "acme", ["staff"], "How do I request a new laptop?")
    record = BY_KEY[("acme", "it/laptops.md")]
    top = result.chunks[0]

    assert top.chunk_id == record.chunk_id
    assert top.chunk_id == chunk_id(document_id("acme", "it/laptops.md"), 0, record.text)
    assert top.document_id == document_id("acme", "it/laptops.md")
    assert top.title == record.title
    assert top.text == record.text


def test_one_shard_serves_several_tenants_without_mixing(retriever: Retriever) -> None:
    batch = RetrievalInput(top_k=10, items=[
        RetrievalItem(request_id="a", tenant="acme", grants=["staff"], query="laptop"),
        RetrievalItem(request_id="g", tenant="globex", grants=["hr"], query="laptop"),
        RetrievalItem(request_id="n", tenant="nobody", grants=["staff"], query="laptop"),
    ])

    results = {r.request_id: r for r in retriever.retrieve(batch).results}

    assert {c.chunk_id for c in results["a"].chunks} == _readable("acme", ["staff"])
    assert [c.chunk_id for c in results["g"].chunks] == [BY_KEY[("globex", "hr/leave.md")].chunk_id]
    assert results["n"].outcome is not None and results["n"].outcome.status == Status.ABSTAINED


def test_a_chunk_needs_every_one_of_its_acl_labels_among_the_grants(
        embedder: Embedder, tmp_path: Path) -> None:
    restricted = Doc("acme", "sec/keys.md", ["security", "staff"], "Key rotation",
                     "Signing keys are rotated every ninety days by the security team.")
    records = [*RECORDS, _record(restricted)]
    write_index(tmp_path, embedder.encode([r.text for r in records]), records)
    subset = Retriever(embedder, tmp_path, "idx-acl")
    question = "How often are signing keys rotated?"
    staff_only = _retrieve_one(subset, "acme", ["staff"], question)
    both = _retrieve_one(subset, "acme", ["staff", "security"], question)
    assert _record(restricted).chunk_id not in {c.chunk_id for c in staff_only.chunks}
    assert both.chunks[0].chunk_id == _record(restricted).chunk_id


def test_hybrid_fusion_ranks_an_exact_identifier_first_and_keeps_the_acl(
        embedder: Embedder, tmp_path: Path) -> None:
    from tasks.lexical import LEXICAL_DIRNAME, LexicalIndex

    tickets = [Doc("acme", f"tickets/inc-{n}.md", ["staff"], f"INC-{n}",
                   f"INC-{n}: the billing queue stalled and invoices were delayed for a day.")
               for n in (2051, 2057, 2063)]
    records = [*RECORDS, *(_record(t) for t in tickets)]
    write_index(tmp_path, embedder.encode([r.text for r in records]), records)
    LexicalIndex.build(list(enumerate(r.text for r in records))).save(tmp_path / LEXICAL_DIRNAME)
    hybrid = Retriever(embedder, tmp_path, "idx-hybrid")
    assert hybrid.hybrid
    result = _retrieve_one(hybrid, "acme", ["staff"], "What happened in INC-2057?", top_k=3)
    assert result.chunks[0].chunk_id == _record(tickets[1]).chunk_id
    # First in both rankings: its score is the fused one, 2 / (60 + 1), not a cosine.
    assert result.chunks[0].score == pytest.approx(2 / 61)
    other = _retrieve_one(hybrid, "globex", ["staff", "hr"], "What happened in INC-2057?")
    assert {c.document_id for c in other.chunks} <= {
        r.document_id for r in RECORDS if r.tenant == "globex"}


def test_labels_and_tenants_the_index_does_not_hold_prepare_no_new_filter(
        retriever: Retriever) -> None:
    # Grants are any labels a caller sends: only those the index holds shape the filter,
    # so a stream of made-up labels or tenants cannot grow what the retriever keeps.
    staff = _retrieve_one(retriever, "acme", ["staff"], "laptop")
    padded = [_retrieve_one(retriever, "acme", ["staff", f"junk{i}"], "laptop") for i in range(5)]
    strangers = [_retrieve_one(retriever, f"tenant{i}", ["staff"], "laptop") for i in range(5)]

    assert all(p.chunks == staff.chunks for p in padded)
    assert all(s.chunks == [] for s in strangers)
    assert retriever._allowed_ids("acme", ["staff", "junk0"]) is retriever._allowed_ids(
        "acme", ["staff"])
    assert retriever._allowed_ids("tenant1", ["staff"]) is retriever._allowed_ids(
        "tenant2", ["hr"])
