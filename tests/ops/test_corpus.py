"""Ingestion and index management on the embedded store: incremental re-ingest, pruning, bad
files by name, activation and rollback, and the CLI around them. Real embedder and tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from tasks.indexing import document_id, read_index
from tests.services import race
from workers.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    from workers.store.migrate import upgrade

    data = tmp_path / "data"
    monkeypatch.setenv("SLUICE_DATA_DIR", str(data))
    monkeypatch.setenv("SLUICE_DATABASE_URL", f"sqlite:///{data / 'audit.db'}")
    monkeypatch.setenv("SLUICE_BROKER_URL", f"sluicesql+sqlite:///{data / 'broker.db'}")
    current = Settings()
    upgrade(current.database_url)
    return current


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "wiki"
    (folder / "ops").mkdir(parents=True)
    (folder / "deploy.md").write_text("# Deploys\n\nDeploys go out on Tuesdays and Thursdays.\n")
    (folder / "ops" / "oncall.txt").write_text("On-call handoff is Monday at 10:00.\n")
    (folder / "billing.html").write_text("<html><title>Billing</title><body><h1>Billing</h1>"
                                         "<p>Invoices are sent on the 1st.</p></body></html>")
    (folder / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "empty.md").write_text("\n\n")
    (folder / "diagram.png").write_bytes(b"\x89PNG")
    return folder


def _chunk_ids(settings: Settings, doc_id: str) -> list[str]:
    from workers.store.engine import session_scope
    from workers.store.models import Chunk

    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Chunk.id).where(Chunk.document_id == doc_id)
                                    .order_by(Chunk.ordinal)))


def _indexed_documents(settings: Settings) -> set[str]:
    from ops.corpus import list_indexes

    active = next(r for r in list_indexes(settings) if r.active)
    _, chunks = read_index(settings.index_dir / active.id)
    return {c.document_id for c in chunks}


def _assert_reused_vectors_are_the_embeddings(settings: Settings) -> None:
    import numpy as np

    from ops.corpus import list_indexes
    from tasks.embedding import Embedder

    active = next(r for r in list_indexes(settings) if r.active)
    index, chunks = read_index(settings.index_dir / active.id)
    stored = index.vectors(np.arange(len(chunks)))
    fresh = Embedder(settings.embedder_model).encode([c.text for c in chunks])
    assert np.allclose(stored, fresh, atol=1e-4)


def test_ingest_is_incremental_reports_bad_files_and_prunes(settings: Settings, docs: Path) -> None:
    from ops.corpus import build_index, ingest_paths

    first = ingest_paths(settings, [docs], "acme", ["engineering"])
    assert (first.added, first.unchanged) == (3, 0)
    assert sorted(Path(p).name for p, _ in first.skipped) == ["diagram.png", "empty.md", "latin1.md"]
    deploy, oncall = document_id("acme", "deploy.md"), document_id("acme", "ops/oncall.txt")
    oncall_chunks = _chunk_ids(settings, oncall)
    embedded: list[int] = []
    build_index(settings, lambda done, total: embedded.append(total))
    assert embedded[-1] == 3  # one chunk per file, all new
    assert _indexed_documents(settings) == {deploy, oncall, document_id("acme", "billing.html")}

    again = ingest_paths(settings, [docs], "acme", ["engineering"])
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 3, 0)

    (docs / "deploy.md").write_text("# Deploys\n\nDeploys go out on Wednesdays only.\n")
    (docs / "billing.html").unlink()
    changed = ingest_paths(settings, [docs], "acme", ["engineering"], prune=True)
    assert (changed.updated, changed.unchanged, changed.retired) == (1, 1, 1)
    assert _chunk_ids(settings, oncall) == oncall_chunks  # untouched file, same chunk ids
    embedded.clear()
    build_index(settings, lambda done, total: embedded.append(total))
    assert embedded[-1] == 1  # only the changed file's chunk is embedded; the rest is reused
    assert _indexed_documents(settings) == {deploy, oncall}  # the pruned file is not served
    _assert_reused_vectors_are_the_embeddings(settings)

    (docs / "billing.html").write_text("<p>Invoices are sent on the 1st.</p>")
    assert ingest_paths(settings, [docs], "acme", ["engineering"]).restored == 0  # changed: updated
    from workers.store.engine import session_scope
    from workers.store.models import Document

    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Document)
                              .where(Document.retired.is_(True))) == 0


def test_a_new_acl_makes_a_new_index_and_rollback_returns_to_the_previous(settings: Settings,
                                                                          docs: Path) -> None:
    from ops.corpus import (
        CorpusError,
        activate_index,
        build_index,
        ingest_paths,
        list_indexes,
        rollback_index,
    )

    with pytest.raises(CorpusError, match="no live chunks"):
        build_index(settings)
    ingest_paths(settings, [docs], "acme", ["engineering"])
    first, built = build_index(settings)
    assert built
    with pytest.raises(CorpusError, match="nothing to roll back"):
        rollback_index(settings)
    relabelled = ingest_paths(settings, [docs], "acme", ["engineering", "hr"])
    assert relabelled.updated == 3
    second, built = build_index(settings)
    assert built and second != first  # same texts, same chunk ids, other ACL: another index
    assert [r.id for r in list_indexes(settings) if r.active] == [second]

    assert rollback_index(settings) == (second, first)
    assert [r.id for r in list_indexes(settings) if r.active] == [first]
    assert activate_index(settings, second[:10]) == first
    assert [r.id for r in list_indexes(settings) if r.active] == [second]
    with pytest.raises(CorpusError, match="no index"):
        activate_index(settings, "idx-does-not-exist")


def test_the_ingest_and_index_commands(settings: Settings, docs: Path) -> None:
    from ops.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["ingest", str(docs), "--tenant", "globex", "--acl", "public"])
    assert done.exit_code == 0, done.output
    assert "3 added" in done.output and "3 skipped" in done.output
    assert "latin1.md" in done.output and "not UTF-8" in done.output
    assert "sluice index build" in done.output
    built = runner.invoke(app, ["index", "build"])
    assert built.exit_code == 0, built.output
    assert "activated idx-" in built.output
    listed = runner.invoke(app, ["index", "list"])
    assert listed.exit_code == 0 and "flat" in listed.output
    index_id = re.search(r"activated (idx-\w+)", built.output)
    assert index_id and index_id.group(1) in listed.output  # whole, however narrow the terminal
    for tenant in (["--tenant", "globex"], []):  # files of one tenant; <tenant>/<acl> trees
        missing = runner.invoke(app, ["ingest", str(docs), str(docs / "nope"), *tenant])
        assert missing.exit_code == 1
        assert f"not found: {docs / 'nope'}; nothing ingested" in missing.output
    assert runner.invoke(app, ["index", "rollback"]).exit_code == 1


def test_ingest_refuses_a_tenant_no_request_could_name(settings: Settings, docs: Path,
                                                       tmp_path: Path) -> None:
    from ops.cli import app
    from workers.store.engine import session_scope
    from workers.store.models import Document, Tenant

    runner = CliRunner()
    named = runner.invoke(app, ["ingest", str(docs), "--tenant", "acme corp"])
    tree = tmp_path / "tree"
    (tree / "globex" / "public").mkdir(parents=True)
    (tree / "globex" / "public" / "a.md").write_text("# A\n\nGlobex text.\n")
    (tree / "-bad" / "public").mkdir(parents=True)
    in_tree = runner.invoke(app, ["ingest", str(tree)])

    assert named.exit_code == 1
    assert "tenant 'acme corp' is not a valid tenant name" in named.output
    assert in_tree.exit_code == 1 and "tenant '-bad' (the folder" in in_tree.output
    with session_scope(settings.database_url) as session:  # nothing of either ingested
        assert session.scalar(select(Document.id)) is None
        assert session.scalar(select(Tenant.id)) is None


def test_a_worker_refuses_an_index_built_with_another_embedder(store_url: str,
                                                               tmp_path: Path) -> None:
    from workers.runtime import IndexMismatch, Runtime
    from workers.store.engine import session_scope
    from workers.store.models import IndexVersion

    # Given an active index whose vectors another embedder (or other weights) made
    with session_scope(store_url) as session:
        session.add(IndexVersion(id="idx-other", path=str(tmp_path), chunk_count=1, params={},
                                 embedder="other-model-0123456789ab:00000000:feedface",
                                 active=True))
    runtime = Runtime(Settings(database_url=store_url, data_dir=tmp_path))
    # Then retrieval does not search it with this worker's query vectors
    with pytest.raises(IndexMismatch, match="built with embedder other-model-0123456789ab"):
        runtime.retriever()


def test_two_first_runs_at_once_build_one_example_index(settings: Settings,
                                                        tmp_path: Path) -> None:
    from ops.corpus import ensure_example_index
    from workers.store.engine import session_scope
    from workers.store.models import IndexVersion

    tree = tmp_path / "corpus"
    (tree / "globex" / "public").mkdir(parents=True)
    (tree / "globex" / "public" / "a.md").write_text("# Docks\n\nDock 4 opens at 06:00.\n")
    fresh = settings.model_copy(update={"corpus_dir": tree})

    # Given two commands starting on a data dir with no index
    built = race(2, lambda: ensure_example_index(fresh), timeout_s=300)
    # Then one builds the index and the other finds it
    assert len(built) == 2 and built.count(None) == 1
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(IndexVersion.id).where(
            IndexVersion.active.is_(True))).all() == [b for b in built if b]
