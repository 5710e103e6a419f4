"""Validated outputs to Markdown: the model's source labels become numbered citations that
resolve to source documents, listed at the end. Pure functions, no store."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"\[(S\d+)\]")
_DROPPED = "\x00"


@dataclass(frozen=True)
class SourceRef:
    """Where a cited chunk comes from."""

    document_id: str
    title: str
    location: str  # "<tenant>/<path>" for a document, the tool call for a tool result


def render_markdown(text: str, labels: dict[str, str], sources: dict[str, SourceRef]) -> str:
    """Replace [S#] labels by [n], numbered per source document in order of first citation,
    and append the numbered list of those documents. A label that maps to no known chunk is
    dropped from the text (validation refuses such outputs; this is only a safeguard)."""
    numbers: dict[str, int] = {}
    cited_chunks: dict[str, list[str]] = {}

    def number(match: re.Match[str]) -> str:
        chunk_id = labels.get(match.group(1))
        source = sources.get(chunk_id or "")
        if chunk_id is None or source is None:
            return _DROPPED
        n = numbers.setdefault(source.document_id, len(numbers) + 1)
        chunks = cited_chunks.setdefault(source.document_id, [])
        if chunk_id not in chunks:
            chunks.append(chunk_id)
        return f"[{n}]"

    body = re.sub(r"\s*" + _DROPPED, "", _LABEL.sub(number, text).strip())
    body = re.sub(r"(?:\s*\[\d+\])+", _dedupe, body)
    if not numbers:
        return body + "\n"
    by_document = {s.document_id: s for s in sources.values()}
    lines = [body, "", "**Sources**", ""]
    for document_id, n in numbers.items():
        ref = by_document[document_id]
        chunk_list = ", ".join(f"`{c}`" for c in cited_chunks[document_id])
        lines.append(f"{n}. {ref.title} — `{ref.location}` (document `{document_id}`; "
                     f"chunks {chunk_list})")
    return "\n".join(lines) + "\n"


def _dedupe(match: re.Match[str]) -> str:
    """'[1] [1][2]' -> ' [1][2]': each number once per run of citations."""
    seen = list(dict.fromkeys(re.findall(r"\[\d+\]", match.group(0))))
    lead = " " if match.group(0)[:1].isspace() else ""
    return lead + "".join(seen)
