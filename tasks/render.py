"""Validated outputs to Markdown: the model's source labels become numbered citations that
resolve to source documents, listed at the end. Pure functions, no store."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from schemas.documents import Document, DocumentModel, document_from_mapping

_LABEL = re.compile(r"\[(S\d+)\]")
_DROPPED = "\x00"


@dataclass(frozen=True)
class SourceRef:
    """Where a cited chunk comes from."""

    document_id: str
    title: str
    location: str  # "<tenant>/<path>" for a document, the tool call for a tool result


@dataclass
class _Citations:
    """One output's citation numbers: per source document, in order of first citation."""

    labels: dict[str, str]
    sources: dict[str, SourceRef]
    numbers: dict[str, int] = field(default_factory=dict)
    cited_chunks: dict[str, list[str]] = field(default_factory=dict)

    def number(self, text: str) -> str:
        """Replace [S#] labels by [n]. A label that maps to no known chunk is dropped from the
        text (validation refuses such outputs; this is only a safeguard)."""
        body = re.sub(r"\s*" + _DROPPED, "", _LABEL.sub(self._number, text).strip())
        return re.sub(r"(?:\s*\[\d+\])+", _dedupe, body)

    def _number(self, match: re.Match[str]) -> str:
        chunk_id = self.labels.get(match.group(1))
        source = self.sources.get(chunk_id or "")
        if chunk_id is None or source is None:
            return _DROPPED
        n = self.numbers.setdefault(source.document_id, len(self.numbers) + 1)
        chunks = self.cited_chunks.setdefault(source.document_id, [])
        if chunk_id not in chunks:
            chunks.append(chunk_id)
        return f"[{n}]"

    def with_sources(self, body: str) -> str:
        """The body and, when it cites anything, the numbered list of cited documents."""
        if not self.numbers:
            return body + "\n"
        by_document = {s.document_id: s for s in self.sources.values()}
        lines = [body, "", "**Sources**", ""]
        for document_id, n in self.numbers.items():
            ref = by_document[document_id]
            chunk_list = ", ".join(f"`{c}`" for c in self.cited_chunks[document_id])
            lines.append(f"{n}. {ref.title} — `{ref.location}` (document `{document_id}`; "
                         f"chunks {chunk_list})")
        return "\n".join(lines) + "\n"


def render_markdown(text: str, labels: dict[str, str], sources: dict[str, SourceRef]) -> str:
    """Replace [S#] labels by [n], numbered per source document in order of first citation,
    and append the numbered list of those documents."""
    citations = _Citations(labels, sources)
    return citations.with_sources(citations.number(text))


def render_document(doc: DocumentModel | Document | Mapping[str, Any], labels: dict[str, str],
                    sources: dict[str, SourceRef]) -> str:
    """`# title`, then `## heading` and body per section, citations numbered across the whole
    document as `render_markdown` numbers them, and one Sources list at the end. `doc` is a
    template's model, a `Document`, or a mapping of either."""
    document = as_document(doc)
    citations = _Citations(labels, sources)
    parts = [f"# {_one_line(citations.number(document.title))}"]
    for section in document.sections:
        parts += [f"## {_one_line(citations.number(section.heading))}", citations.number(section.body)]
    return citations.with_sources("\n\n".join(parts))


def as_document(doc: BaseModel | Mapping[str, Any]) -> Document:
    """A document in its rendered shape (title and sections), whatever model it came in."""
    if isinstance(doc, DocumentModel):
        return doc.as_document()
    if isinstance(doc, Document):
        return doc
    return document_from_mapping(doc.model_dump() if isinstance(doc, BaseModel) else doc)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _dedupe(match: re.Match[str]) -> str:
    """'[1] [1][2]' -> ' [1][2]': each number once per run of citations."""
    seen = list(dict.fromkeys(re.findall(r"\[\d+\]", match.group(0))))
    lead = " " if match.group(0)[:1].isspace() else ""
    return lead + "".join(seen)
