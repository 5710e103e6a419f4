"""Chunking and FAISS index files: plain functions, no store."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks.vector_index import IndexSpec, VectorIndex, VectorIndexError, build_index, choose_spec

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


def index_params(chunk_count: int) -> dict[str, object]:
    """The parameters of the index `write_index` builds for this many chunks, for `index_id`."""
    return choose_spec(chunk_count).params()


def write_index(folder: Path, vectors: np.ndarray, chunks: list[ChunkRecord],
                spec: IndexSpec | None = None) -> IndexSpec:
    """The vector index (exact or HNSW by count, see tasks.vector_index; ids are positions in
    the chunk table) plus index.json (its spec) and the chunk table beside it."""
    if len(vectors) != len(chunks):
        raise VectorIndexError(f"{len(vectors)} vectors for {len(chunks)} chunks")
    index = build_index(vectors, np.arange(len(chunks), dtype=np.int64), spec)
    index.save(folder)
    (folder / "chunks.json").write_text(json.dumps([asdict(c) for c in chunks]), encoding="utf-8")
    return index.spec


def read_index(folder: Path) -> tuple[VectorIndex, list[ChunkRecord]]:
    """The memory-mapped vector index and its chunk table; refuses a pair that do not match."""
    index = VectorIndex.load(folder)
    raw = json.loads((folder / "chunks.json").read_text(encoding="utf-8"))
    if len(raw) != index.count:
        raise VectorIndexError(f"{folder}: {index.count} vectors but {len(raw)} chunks")
    return index, [ChunkRecord(**c) for c in raw]
