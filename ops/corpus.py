"""Ingesting files into the store, and building, listing, activating and rolling back indexes.

Document ids: sha256("<tenant>/<path>")[:16] (tasks.indexing.document_id), where <path> is
the file's path relative to the folder given to `sluice ingest` (for a file given by itself,
its name). In the tree layout of the example corpus (<root>/<tenant>/<acl>/<file>) it is
relative to the tenant folder, e.g. "engineering/deploy-runbook.md".

Each file is its own transaction: a bad file is reported by name and skipped, a crash loses
at most the file in hand, and re-ingesting an unchanged file writes nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from schemas.requests import is_valid_name
from tasks.documents import SUFFIXES, BadDocument, CountTokens, read_document, split_text
from tasks.embedding import Embedder
from tasks.indexing import (
    ChunkRecord,
    chunk_id,
    document_id,
    index_id,
    index_params,
    read_index,
    write_index,
)
from tasks.lexical import LEXICAL_DIRNAME, TOKENIZER_VERSION, LexicalIndex
from tasks.retrieval import FUSION_DEPTH, RRF_K
from workers.cache import embedder_space
from workers.settings import Settings
from workers.store.admission import ensure_tenants
from workers.store.engine import session_scope
from workers.store.models import Chunk, Document, IndexActivation, IndexVersion
from workers.store.timeutil import utcnow

Progress = Callable[[int, int], None]


class CorpusError(ValueError):
    """A corpus or index command that cannot be carried out; the message says why."""


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    restored: int = 0  # retired earlier, present again
    retired: int = 0
    chunks: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.restored or self.retired)


@dataclass(frozen=True)
class SourceFile:
    path: Path
    relative: str  # the part of the document id after the tenant
    acl: tuple[str, ...]


def collect(paths: list[Path], acl: list[str]) -> tuple[dict[Path, list[SourceFile]], list[tuple[str, str]]]:
    """Files to ingest, grouped by the folder they are relative to; missing paths reported."""
    groups: dict[Path, list[SourceFile]] = {}
    missing = []
    labels = tuple(sorted(set(acl)))
    for given in paths:
        if given.is_file():
            root = given.resolve().parent
            groups.setdefault(root, []).append(SourceFile(given, given.name, labels))
        elif given.is_dir():
            root = given.resolve()
            groups.setdefault(root, []).extend(
                SourceFile(p, p.relative_to(given).as_posix(), labels) for p in _files(given))
        else:
            missing.append((str(given), "no such file or folder"))
    return groups, missing


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, in path order, leaving out hidden files and folders."""
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def ingest_paths(settings: Settings, paths: list[Path], tenant: str, acl: list[str], *,
                 prune: bool = False, progress: Progress | None = None,
                 count_tokens: CountTokens | None = None) -> IngestReport:
    """`sluice ingest PATH... --tenant T --acl L,...`: each folder's files (recursively) and
    each file given, under one tenant and ACL. `prune` retires documents that an ingested
    folder held before and no longer does."""
    if not acl:
        raise CorpusError("at least one ACL label is needed (e.g. --acl public)")
    groups, missing = collect(paths, acl)
    report = IngestReport(skipped=list(missing))
    _ingest_groups(settings, tenant, groups, report, prune, progress, count_tokens)
    return report


def ingest_tree(settings: Settings, root: Path, *, prune: bool = False,
                progress: Progress | None = None,
                count_tokens: CountTokens | None = None) -> IngestReport:
    """The tree layout: <root>/<tenant>/<acl label>/<files>; ids relative to the tenant."""
    if not root.is_dir():
        raise CorpusError(f"corpus folder not found: {root}")
    report = IngestReport()
    tenant_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for tenant_dir in tenant_dirs:  # all checked before any is ingested
        _check_tenant(tenant_dir.name, f" (the folder {tenant_dir})")
    for tenant_dir in tenant_dirs:
        ingest_tenant_folder(settings, tenant_dir.name, tenant_dir, prune=prune,
                             progress=progress, count_tokens=count_tokens, report=report)
    return report


def ingest_tenant_folder(settings: Settings, tenant: str, folder: Path, *, prune: bool = False,
                         progress: Progress | None = None,
                         count_tokens: CountTokens | None = None,
                         report: IngestReport | None = None) -> IngestReport:
    """One tenant's folder of <acl label>/<files>; document ids relative to the folder."""
    if not folder.is_dir():
        raise CorpusError(f"corpus folder not found: {folder}")
    report = report if report is not None else IngestReport()
    files = [SourceFile(p, p.relative_to(folder).as_posix(), (p.relative_to(folder).parts[0],))
             for p in _files(folder) if len(p.relative_to(folder).parts) > 1]
    _ingest_groups(settings, tenant, {folder.resolve(): files}, report, prune, progress,
                   count_tokens)
    return report


def _ingest_groups(settings: Settings, tenant: str, groups: dict[Path, list[SourceFile]],
                   report: IngestReport, prune: bool, progress: Progress | None,
                   count_tokens: CountTokens | None) -> None:
    _check_tenant(tenant)
    if count_tokens is None:
        from tasks.documents import embedder_token_counter

        count_tokens = embedder_token_counter(settings.embedder_model)
    with session_scope(settings.database_url) as session:
        ensure_tenants(session, {tenant})
    total = sum(len(files) for files in groups.values())
    done = 0
    for root, files in groups.items():
        seen = set()
        for source in files:
            seen.add(document_id(tenant, source.relative))
            _ingest_one(settings, tenant, root, source, count_tokens, report)
            done += 1
            if progress:
                progress(done, total)
        if prune:
            report.retired += _retire_missing(settings, tenant, root, seen)


def _check_tenant(tenant: str, where: str = "") -> None:
    """A tenant no request could name would own documents nobody can read."""
    if not is_valid_name(tenant):
        raise CorpusError(f"tenant {tenant!r}{where} is not a valid tenant name: 1-128 "
                          f"letters, digits and _.:- starting with a letter or digit")


def _ingest_one(settings: Settings, tenant: str, root: Path, source: SourceFile,
                count_tokens: CountTokens, report: IngestReport) -> None:
    if source.path.suffix.lower() not in SUFFIXES:
        report.skipped.append((str(source.path), f"unsupported file type "
                               f"{source.path.suffix or '(none)'}"))
        return
    try:
        doc = read_document(source.path)
    except BadDocument as exc:
        report.skipped.append((str(source.path), str(exc)))
        return
    doc_id = document_id(tenant, source.relative)
    sha = hashlib.sha256(doc.raw).hexdigest()
    acl = list(source.acl)
    with session_scope(settings.database_url) as session:
        existing = session.get(Document, doc_id)
        if existing is not None and existing.sha256 == sha and list(existing.acl) == acl:
            if existing.retired:
                existing.retired, existing.retired_at, existing.updated_at = False, None, utcnow()
                report.restored += 1
            else:
                report.unchanged += 1
            return
        pieces = split_text(doc.text, count_tokens)
        if existing is None:
            session.add(Document(id=doc_id, tenant_id=tenant, path=source.relative, title=doc.title,
                                 acl=acl, sha256=sha, source=str(root), updated_at=utcnow()))
            report.added += 1
        else:
            session.execute(delete(Chunk).where(Chunk.document_id == doc_id))
            existing.title, existing.acl, existing.sha256 = doc.title, acl, sha
            existing.source, existing.retired, existing.retired_at = str(root), False, None
            existing.updated_at = utcnow()
            report.updated += 1
        session.flush()
        session.add_all(Chunk(id=chunk_id(doc_id, i, piece), document_id=doc_id, tenant_id=tenant,
                              ordinal=i, text=piece, acl=acl) for i, piece in enumerate(pieces))
        report.chunks += len(pieces)


def _retire_missing(settings: Settings, tenant: str, root: Path, seen: set[str]) -> int:
    """Documents this folder held that it holds no more: kept for the record, never served
    again once the next index is built without them."""
    with session_scope(settings.database_url) as session:
        gone = [d for d in session.scalars(select(Document).where(
            Document.tenant_id == tenant, Document.source == str(root),
            Document.retired.is_(False))) if d.id not in seen]
        now = utcnow()
        for doc in gone:
            doc.retired, doc.retired_at = True, now
        return len(gone)


# -- indexes -------------------------------------------------------------------------------------


def build_index(settings: Settings, progress: Progress | None = None) -> tuple[str, bool]:
    """Embed the live (not retired) chunks and activate the index named by the hash of
    (chunk set with tenants and ACLs, embedder, parameters). Returns (id, newly built)."""
    # The vector space, weights included: fine-tuned weights dropped into the same folder
    # make a new index, embedded again, not the old one's vectors under the new name.
    embedder_name = embedder_space(settings)
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(Chunk, Document.title).join(Document)
                               .where(Document.retired.is_(False))
                               .order_by(Chunk.tenant_id, Chunk.document_id, Chunk.ordinal)).all()
        chunks = [ChunkRecord(c.id, c.document_id, c.tenant_id, list(c.acl), title, c.ordinal,
                              c.text) for c, title in rows]
    if not chunks:
        raise CorpusError("no live chunks: ingest a corpus first (`sluice ingest`)")
    params = {**index_params(len(chunks)), "lexical": TOKENIZER_VERSION,
              "fusion": f"rrf-k{RRF_K}-d{FUSION_DEPTH}"}
    # Tenant and ACL are part of what an index serves: a relabelled chunk is a new index.
    members = [f"{c.chunk_id}:{c.tenant}:{','.join(sorted(c.acl))}" for c in chunks]
    new_id = index_id(members, embedder_name, params)
    with session_scope(settings.database_url) as session:
        if session.get(IndexVersion, new_id) is not None:
            _activate(session, new_id, "build")
            return new_id, False
    vectors = _vectors(settings, embedder_name, chunks, progress)
    folder = settings.index_dir / new_id
    spec = write_index(folder, vectors, chunks)
    LexicalIndex.build(list(enumerate(c.text for c in chunks))).save(folder / LEXICAL_DIRNAME)
    with session_scope(settings.database_url) as session:
        session.add(IndexVersion(id=new_id, path=str(folder), embedder=embedder_name,
                                 chunk_count=len(chunks), params={**params, **spec.params()}))
        session.flush()
        _activate(session, new_id, "build")
    return new_id, True


def _vectors(settings: Settings, embedder_name: str, chunks: list[ChunkRecord],
             progress: Progress | None):  # type: ignore[no-untyped-def]
    """Vectors for every chunk: reused from the active index where it holds the same chunk
    (same id: same text at the same place) under the same embedder; only the pending rest
    is embedded (and counted by `progress`)."""
    import numpy as np

    with session_scope(settings.database_url) as session:
        active = session.scalar(select(IndexVersion).where(IndexVersion.active.is_(True),
                                                           IndexVersion.embedder == embedder_name))
    known: dict[str, int] = {}
    previous = None
    if active is not None and Path(active.path).is_dir():
        previous, old_chunks = read_index(Path(active.path))
        known = {c.chunk_id: i for i, c in enumerate(old_chunks)}
    reuse = [i for i, c in enumerate(chunks) if c.chunk_id in known]
    pending = [i for i, c in enumerate(chunks) if c.chunk_id not in known]
    fresh = _embed(settings, [chunks[i].text for i in pending], progress) if pending else None
    dim = fresh.shape[1] if fresh is not None else previous.dim  # type: ignore[union-attr]
    vectors = np.empty((len(chunks), dim), dtype=np.float32)
    if reuse:
        assert previous is not None
        vectors[reuse] = previous.vectors(np.array([known[chunks[i].chunk_id] for i in reuse]))
    if fresh is not None:
        vectors[pending] = fresh
    return vectors


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


def _activate(session: Session, new_id: str, reason: str) -> str | None:
    """Make `new_id` the one active index and log the activation; returns the one replaced."""
    previous = session.scalar(select(IndexVersion.id).where(IndexVersion.active.is_(True)))
    if previous == new_id:
        return previous
    session.execute(update(IndexVersion).values(active=IndexVersion.id == new_id))
    session.add(IndexActivation(index_id=new_id, previous_id=previous, reason=reason,
                                activated_at=utcnow()))
    return previous


@dataclass(frozen=True)
class IndexRow:
    id: str
    kind: str
    chunks: int
    embedder: str
    created_at: str
    active: bool
    on_disk: bool


def list_indexes(settings: Settings) -> list[IndexRow]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(IndexVersion).order_by(IndexVersion.created_at)).all()
        return [IndexRow(r.id, str(r.params.get("kind", "?")), r.chunk_count, r.embedder,
                         r.created_at.isoformat(timespec="seconds"), r.active,
                         Path(r.path).is_dir()) for r in rows]


def activate_index(settings: Settings, wanted: str) -> str | None:
    """Activate a built index by id (or unique id prefix); returns the id it replaced."""
    with session_scope(settings.database_url) as session:
        matches = session.scalars(select(IndexVersion).where(
            IndexVersion.id.startswith(wanted))).all()
        if len(matches) != 1:
            raise CorpusError(f"no index {wanted!r}" if not matches else
                              f"{wanted!r} matches {len(matches)} indexes; give more of the id")
        target = matches[0]
        if not Path(target.path).is_dir():
            raise CorpusError(f"index {target.id} is recorded but its files are gone: {target.path}")
        return _activate(session, target.id, "activate")


def rollback_index(settings: Settings) -> tuple[str, str]:
    """Re-activate the index the current one replaced; returns (from, to)."""
    with session_scope(settings.database_url) as session:
        current = session.scalar(select(IndexVersion.id).where(IndexVersion.active.is_(True)))
        if current is None:
            raise CorpusError("no active index to roll back from")
        last = session.scalar(select(IndexActivation).where(IndexActivation.index_id == current)
                              .order_by(IndexActivation.id.desc()).limit(1))
        if last is None or last.previous_id is None:
            raise CorpusError(f"{current} replaced no earlier index: nothing to roll back to")
        target = session.get(IndexVersion, last.previous_id)
        if target is None or not Path(target.path).is_dir():
            raise CorpusError(f"the previous index {last.previous_id} is no longer on disk")
        _activate(session, target.id, "rollback")
        return current, target.id


def ensure_example_index(settings: Settings, progress: Progress | None = None) -> str | None:
    """Embedded default: ingest the example corpus and build an index when none is active.
    Commands started at once on a fresh data dir take turns (a lock file in it): the first
    builds, the others find its index."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (settings.data_dir / "example-index.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with session_scope(settings.database_url) as session:
            active = session.scalar(select(IndexVersion.id)
                                    .where(IndexVersion.active.is_(True)))
        if active:
            return None
        ingest_tree(settings, settings.corpus_dir)
        seed_example_records(settings)
        return build_index(settings, progress)[0]


def seed_example_records(settings: Settings, corpus_dir: Path | None = None) -> int:
    """The system of record the lookup tools read: the example incident tickets."""
    from workers.store.records import seed_tickets

    with session_scope(settings.database_url) as session:
        return seed_tickets(session, corpus_dir or settings.corpus_dir).inserted
