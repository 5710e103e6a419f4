"""Ingesting a corpus folder into the store and building the FAISS index from the chunk table.

Layout: <root>/<tenant>/<acl label>/<file>.md|.txt. A document's id is
sha256("<tenant>/<path relative to the tenant folder>")[:16] (see tasks.indexing.document_id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from tasks.embedding import Embedder, embedder_id
from tasks.indexing import ChunkRecord, chunk_id, document_id, index_id, split_markdown, write_index
from workers.settings import Settings
from workers.store.admission import ensure_tenants
from workers.store.engine import session_scope
from workers.store.models import Chunk, Document, IndexVersion

SUFFIXES = {".md", ".markdown", ".txt"}
Progress = Callable[[int, int], None]


@dataclass
class IngestReport:
    added: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def ingest_tree(settings: Settings, root: Path) -> IngestReport:
    """Ingest every tenant folder under `root`; bad files are reported and skipped."""
    report = IngestReport()
    with session_scope(settings.database_url) as session:
        for tenant_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            ensure_tenants(session, {tenant_dir.name})
            for path in sorted(tenant_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in SUFFIXES:
                    _ingest_file(session, tenant_dir, path, report)
    return report


def _ingest_file(session: Session, tenant_dir: Path, path: Path, report: IngestReport) -> None:
    relative = path.relative_to(tenant_dir).as_posix()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        report.skipped.append((str(path), f"unreadable: {exc}"))
        return
    if not text.strip():
        report.skipped.append((str(path), "empty"))
        return
    tenant, acl = tenant_dir.name, [path.relative_to(tenant_dir).parts[0]]
    doc_id = document_id(tenant, relative)
    sha = hashlib.sha256(text.encode()).hexdigest()
    existing = session.get(Document, doc_id)
    if existing is not None and existing.sha256 == sha:
        report.unchanged += 1
        return
    if existing is not None:
        session.execute(delete(Chunk).where(Chunk.document_id == doc_id))
        session.delete(existing)
        session.flush()
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")),
                 path.stem)
    session.add(Document(id=doc_id, tenant_id=tenant, path=relative, title=title, acl=acl,
                         sha256=sha))
    session.flush()
    session.add_all(Chunk(id=chunk_id(doc_id, i, piece), document_id=doc_id, tenant_id=tenant,
                          ordinal=i, text=piece, acl=acl)
                    for i, piece in enumerate(split_markdown(text)))
    report.added += 1


def build_index(settings: Settings, progress: Progress | None = None) -> tuple[str, bool]:
    """Embed the live chunk table and activate the index named by its content hash.
    Returns (index id, whether it was newly built)."""
    embedder_name = embedder_id(settings.embedder_model)
    params = {"kind": "flat-ip", "normalised": True}
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(Chunk, Document.title).join(Document)
                               .where(Document.retired.is_(False))
                               .order_by(Chunk.tenant_id, Chunk.document_id, Chunk.ordinal)).all()
        chunks = [ChunkRecord(c.id, c.document_id, c.tenant_id, list(c.acl), title, c.ordinal,
                              c.text) for c, title in rows]
    if not chunks:
        raise ValueError("the chunk table is empty: ingest a corpus first")
    new_id = index_id([c.chunk_id for c in chunks], embedder_name, params)
    with session_scope(settings.database_url) as session:
        if session.get(IndexVersion, new_id) is not None:
            _activate(session, new_id)
            return new_id, False
    vectors = _embed(settings, [c.text for c in chunks], progress)
    folder = settings.index_dir / new_id
    write_index(folder, vectors, chunks)
    with session_scope(settings.database_url) as session:
        session.add(IndexVersion(id=new_id, path=str(folder), embedder=embedder_name,
                                 chunk_count=len(chunks), params=params))
        session.flush()
        _activate(session, new_id)
    return new_id, True


def _embed(settings: Settings, texts: list[str], progress: Progress | None):  # type: ignore[no-untyped-def]
    import numpy as np

    embedder = Embedder(settings.embedder_model)
    parts = []
    batch = 64
    for start in range(0, len(texts), batch):
        parts.append(embedder.encode(texts[start:start + batch]))
        if progress:
            progress(min(start + batch, len(texts)), len(texts))
    return np.vstack(parts)


def _activate(session: Session, new_id: str) -> None:
    session.execute(update(IndexVersion).values(active=IndexVersion.id == new_id))


def ensure_example_index(settings: Settings, progress: Progress | None = None) -> str | None:
    """Embedded default: ingest the example corpus and build an index when none is active."""
    with session_scope(settings.database_url) as session:
        active = session.scalar(select(IndexVersion.id).where(IndexVersion.active.is_(True)))
    if active:
        return None
    ingest_tree(settings, settings.corpus_dir)
    return build_index(settings, progress)[0]
