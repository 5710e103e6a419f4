"""Chunking and FAISS index files: plain functions, no store."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

MAX_CHUNK_WORDS = 160  # well under the embedder's 256-token window


@dataclass(frozen=True)
class ChunkRecord:
    chunk_id: str
    document_id: str
    tenant: str
    acl: list[str]
    title: str
    ordinal: int
    text: str


def document_id(tenant: str, relative_path: str) -> str:
    """sha256 of '<tenant>/<path relative to the ingested folder>', first 16 hex digits."""
    return hashlib.sha256(f"{tenant}/{relative_path}".encode()).hexdigest()[:16]


def chunk_id(doc_id: str, ordinal: int, text: str) -> str:
    """Stable for the same text at the same place in the same document."""
    return hashlib.sha256(f"{doc_id}:{ordinal}:{text}".encode()).hexdigest()[:16]


def split_markdown(text: str, max_words: int = MAX_CHUNK_WORDS) -> list[str]:
    """Split at headings, then at paragraphs, keeping each chunk under `max_words`."""
    sections = re.split(r"(?m)^(?=#{1,6} )", text)
    chunks: list[str] = []
    for section in sections:
        chunks.extend(_pack_paragraphs(section, max_words))
    return [c for c in chunks if c.strip()]


def _pack_paragraphs(section: str, max_words: int) -> list[str]:
    packed: list[str] = []
    current: list[str] = []
    for paragraph in (p.strip() for p in section.split("\n\n")):
        words = paragraph.split()
        if current and len(" ".join(current).split()) + len(words) > max_words:
            packed.append("\n\n".join(current))
            current = []
        while len(words) > max_words:
            packed.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if words:
            current.append(" ".join(words) if len(words) != len(paragraph.split()) else paragraph)
    if current:
        packed.append("\n\n".join(current))
    return packed


def index_id(chunk_ids: list[str], embedder: str, params: dict[str, object]) -> str:
    """The index is named by a hash of (chunk set, embedder, parameters)."""
    digest = hashlib.sha256()
    for cid in sorted(chunk_ids):
        digest.update(cid.encode())
    digest.update(embedder.encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return f"idx-{digest.hexdigest()[:16]}"


def write_index(folder: Path, vectors: np.ndarray, chunks: list[ChunkRecord]) -> None:
    """Exact inner-product index (vectors are normalised) plus the chunk table beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(chunks), dtype=np.int64))
    tmp = folder / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / "index.faiss")
    (folder / "chunks.json").write_text(json.dumps([asdict(c) for c in chunks]), encoding="utf-8")


def read_index(folder: Path) -> tuple[faiss.Index, list[ChunkRecord]]:
    index = faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_MMAP)
    raw = json.loads((folder / "chunks.json").read_text(encoding="utf-8"))
    return index, [ChunkRecord(**c) for c in raw]
