"""Source files to documents, and documents to token-bounded chunks: plain functions, no store.

Markdown and plain text are read as they are; HTML is reduced to the same shape (headings
become `#` lines, blocks become paragraphs, scripts and styles are dropped), so one splitter
serves all three. Chunks follow headings, then paragraphs, then sentences, and every chunk
stays within `max_tokens` of the embedder's own tokenizer (its window is 256 tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
TEXT_SUFFIXES = frozenset({".txt", ".text"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SUFFIXES = MARKDOWN_SUFFIXES | TEXT_SUFFIXES | HTML_SUFFIXES
MAX_CHUNK_TOKENS = 200  # leaves room under the 256-token window for the special tokens
MAX_FILE_BYTES = 20 * 1024 * 1024

CountTokens = Callable[[str], int]


class BadDocument(ValueError):
    """A file that cannot become a document (unreadable, wrong encoding, empty, too large)."""


@dataclass(frozen=True)
class SourceDocument:
    title: str
    text: str  # markdown-shaped: '#' headings, blank lines between paragraphs
    raw: bytes  # the file as read: its hash decides whether a re-ingest changes anything


def read_document(path: Path) -> SourceDocument:
    """Read one file into a document; BadDocument says why it cannot be one."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BadDocument(f"unsupported file type {suffix or '(none)'}; "
                          f"supported: {', '.join(sorted(SUFFIXES))}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BadDocument(f"{size} bytes is over the {MAX_FILE_BYTES}-byte limit")
        raw = path.read_bytes()
    except OSError as exc:
        raise BadDocument(f"unreadable: {exc.strerror or exc}") from None
    try:
        decoded = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadDocument(f"not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    if "\x00" in decoded:
        raise BadDocument("binary content (NUL bytes) in a text file")
    title, text = html_to_text(decoded) if suffix in HTML_SUFFIXES else (None, decoded)
    text = _normalise(text)
    if not text.strip():
        raise BadDocument("empty: no text after reading")
    return SourceDocument(title=title or _first_heading(text) or path.stem, text=text,
                          raw=raw)


def html_to_text(html: str) -> tuple[str | None, str]:
    """(the <title>, the body as markdown-shaped text)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    body = soup.body or soup
    blocks: list[str] = []
    for element in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre",
                                  "blockquote", "td", "th", "dt", "dd"]):
        if element.find_parent(["p", "li", "pre", "blockquote", "td", "th", "dd"]) is not None:
            continue  # its text is already in the enclosing block
        text = element.get_text(" ", strip=True)
        if not text:
            continue
        if element.name and element.name[0] == "h" and element.name[1:].isdigit():
            blocks.append("#" * int(element.name[1:]) + " " + text)
        elif element.name == "li":
            blocks.append("- " + text)
        else:
            blocks.append(text)
    if not blocks:  # no block markup at all: the visible text
        blocks = [body.get_text(" ", strip=True)]
    return title, "\n\n".join(blocks)


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _first_heading(text: str) -> str | None:
    return next((line.lstrip("#").strip() for line in text.splitlines()
                 if line.startswith("#") and line.lstrip("#").strip()), None)


_HEADING = re.compile(r"(?m)^(?=#{1,6} )")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def split_text(text: str, count_tokens: CountTokens, max_tokens: int = MAX_CHUNK_TOKENS) -> list[str]:
    """Chunks that follow headings, then paragraphs, then sentences, then words; each chunk
    is at most `max_tokens` by `count_tokens`."""
    chunks: list[str] = []
    for section in _HEADING.split(text):
        pieces = [p for part in section.split("\n\n") if (p := part.strip())]
        chunks.extend(_pack(_fit(pieces, count_tokens, max_tokens), count_tokens, max_tokens))
    return [c for c in chunks if c.strip()]


def _fit(pieces: list[str], count_tokens: CountTokens, max_tokens: int) -> list[str]:
    """Break any paragraph over the bound into sentences, and any sentence into words."""
    fitted: list[str] = []
    for piece in pieces:
        if count_tokens(piece) <= max_tokens:
            fitted.append(piece)
            continue
        for sentence in _SENTENCE_END.split(piece):
            if count_tokens(sentence) <= max_tokens:
                fitted.append(sentence)
            else:
                fitted.extend(_split_words(sentence, count_tokens, max_tokens))
    return fitted


def _split_words(text: str, count_tokens: CountTokens, max_tokens: int) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    for word in text.split():
        if current and count_tokens(" ".join([*current, word])) > max_tokens:
            out.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        out.append(" ".join(current))
    return out


def _pack(pieces: list[str], count_tokens: CountTokens, max_tokens: int) -> list[str]:
    """Greedily join consecutive pieces of one section while the join stays in bound."""
    packed: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current}\n\n{piece}" if current else piece
        if current and count_tokens(candidate) > max_tokens:
            packed.append(current)
            current = piece
        else:
            current = candidate
    if current:
        packed.append(current)
    return packed


def embedder_token_counter(model_path: str) -> CountTokens:
    """Token counts by the embedder's own tokenizer, without its special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def word_counter(text: str) -> int:
    """A crude stand-in for tests and tools that have no tokenizer at hand."""
    return len(text.split())
