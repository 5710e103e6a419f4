"""Chunking and the stable ids of documents, chunks and indexes."""

from __future__ import annotations

import hashlib

import pytest

from tasks.indexing import MAX_CHUNK_WORDS, chunk_id, document_id, index_id, split_markdown

pytestmark = [pytest.mark.unit]


def _words(n: int, word: str = "alpha") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


def test_split_markdown_keeps_every_chunk_within_the_word_limit() -> None:
    # Given a document with a very long paragraph and many medium ones
    text = "\n\n".join([
        "# Title", _words(3 * MAX_CHUNK_WORDS + 17, "long"),
        *(_words(70, f"p{i}x") for i in range(6)),
        "## Second", _words(MAX_CHUNK_WORDS + 1, "edge"),
    ])

    # When it is split
    chunks = split_markdown(text)

    # Then no chunk is over the limit and no word is lost
    assert chunks
    assert all(len(c.split()) <= MAX_CHUNK_WORDS for c in chunks)
    assert sum(len(c.split()) for c in chunks) == len(text.split())


def test_split_markdown_keeps_the_words_in_document_order() -> None:
    # Given a short paragraph followed by one longer than the limit
    text = "intro words here\n\n" + " ".join(f"w{i}" for i in range(7))

    # When it is split with a limit of three words
    chunks = split_markdown(text, max_words=3)

    # Then reading the chunks in order reads the document in order
    assert all(len(c.split()) <= 3 for c in chunks)
    assert [w for c in chunks for w in c.split()] == text.split()
    assert chunks[0] == "intro words here"


def test_split_markdown_keeps_a_heading_before_its_long_body() -> None:
    text = "# Title\n\n" + _words(2 * MAX_CHUNK_WORDS + 5, "body")

    chunks = split_markdown(text)

    assert chunks[0].startswith("# Title")
    assert [w for c in chunks for w in c.split()] == text.split()


def test_split_markdown_respects_a_smaller_limit() -> None:
    chunks = split_markdown(_words(100), max_words=30)

    assert [len(c.split()) for c in chunks] == [30, 30, 30, 10]


def test_split_markdown_splits_at_headings() -> None:
    text = "# Alpha\n\nAlpha body text.\n\n## Beta\n\nBeta body text.\n\n# Gamma\nGamma body."

    chunks = split_markdown(text)

    assert len(chunks) == 3
    assert chunks[0].startswith("# Alpha") and "Beta" not in chunks[0]
    assert chunks[1].startswith("## Beta") and "Gamma" not in chunks[1]
    assert chunks[2].startswith("# Gamma")


def test_split_markdown_packs_small_paragraphs_together() -> None:
    chunks = split_markdown("one two\n\nthree four\n\nfive six")

    assert chunks == ["one two\n\nthree four\n\nfive six"]


def test_split_markdown_drops_empty_sections() -> None:
    assert split_markdown("") == []
    assert split_markdown("\n\n   \n\n") == []


def test_chunk_id_is_stable_and_depends_on_text_and_ordinal() -> None:
    doc = document_id("acme", "handbook/laptops.md")
    base = chunk_id(doc, 0, "Laptops are requested through the portal.")

    assert base == chunk_id(doc, 0, "Laptops are requested through the portal.")
    assert len(base) == 16
    assert base != chunk_id(doc, 1, "Laptops are requested through the portal.")
    assert base != chunk_id(doc, 0, "Laptops are requested through the helpdesk.")
    assert base != chunk_id(document_id("globex", "handbook/laptops.md"), 0,
                            "Laptops are requested through the portal.")


def test_document_id_is_sha256_of_tenant_and_path() -> None:
    expected = hashlib.sha256(b"acme/handbook/laptops.md").hexdigest()[:16]

    assert document_id("acme", "handbook/laptops.md") == expected
    assert document_id("globex", "handbook/laptops.md") != expected


def test_index_id_ignores_chunk_order_but_not_embedder_or_params() -> None:
    ids = ["c3", "c1", "c2"]
    params = {"metric": "ip", "max_words": 160}
    base = index_id(ids, "minilm-abc", params)

    assert base.startswith("idx-")
    assert base == index_id(list(reversed(ids)), "minilm-abc", params)
    assert base == index_id(ids, "minilm-abc", {"max_words": 160, "metric": "ip"})
    assert base != index_id(ids, "minilm-def", params)
    assert base != index_id(ids, "minilm-abc", {"metric": "ip", "max_words": 120})
    assert base != index_id(ids + ["c4"], "minilm-abc", params)
