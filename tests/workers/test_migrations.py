"""The Alembic migrations build exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext


@pytest.mark.unit
def test_migrating_an_empty_store_to_head_matches_the_models(tmp_path: Path) -> None:
    from workers.store.engine import get_engine
    from workers.store.migrate import upgrade
    from workers.store.models import Base

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


@pytest.mark.unit
def test_a_store_not_ready_is_named_with_what_to_do_and_never_created(tmp_path: Path) -> None:
    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    from workers.store.engine import get_engine
    from workers.store.migrate import (
        StoreNotReady,
        alembic_config,
        check_ready,
        upgrade,
        upgrade_store,
    )

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision("head")
    path = tmp_path / "audit.db"
    url = f"sqlite:///{path}"
    with pytest.raises(StoreNotReady, match=r"no audit store at .*audit\.db: `sluice run FILE`"):
        check_ready(url)
    assert not path.exists()  # looking did not create it

    path.touch()
    with pytest.raises(StoreNotReady, match="has no schema: run `sluice db upgrade`"):
        check_ready(url)

    upgrade(url, str(head.down_revision))
    with pytest.raises(StoreNotReady, match=f"at revision {head.down_revision}, this code "
                                            f"needs {head.revision}: run `sluice db upgrade`"):
        check_ready(url)

    upgrade(url)
    check_ready(url)

    engine = get_engine(url)
    with engine.begin() as conn:  # as a newer sluice would leave it
        conn.execute(sa.text("update alembic_version set version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreNotReady, match="revision 9999, which this code does not know"):
        check_ready(url)
    with pytest.raises(StoreNotReady, match="a newer sluice migrated it"):
        upgrade_store(url)  # not migrated, not downgraded


@pytest.mark.unit
def test_a_file_that_is_no_database_and_an_in_memory_store_are_named(tmp_path: Path) -> None:
    from workers.store.migrate import StoreNotReady, check_ready, upgrade_store

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a SQLite database, " * 100)
    for look in (check_ready, upgrade_store):
        with pytest.raises(StoreNotReady, match=r"cannot use the audit store at .*garbage\.db: "
                                                r"file is not a database$"):
            look(f"sqlite:///{garbage}")
    with pytest.raises(StoreNotReady, match="in-memory store keeps nothing"):
        check_ready("sqlite://")


@pytest.mark.integration
def test_an_unreachable_store_is_named_without_its_password() -> None:
    from workers.store.migrate import StoreNotReady, check_ready

    with pytest.raises(StoreNotReady, match=r"cannot use the audit store at "
                       r"postgresql://sluice:\*\*\*@127\.0\.0\.1:1/x: .*refused") as caught:
        check_ready("postgresql://sluice:secret@127.0.0.1:1/x")
    assert "secret" not in str(caught.value)


@pytest.mark.integration
def test_live_stage_runs_become_pending_shard_stages(empty_store_url: str) -> None:
    """0006 moves the per-item leases into one shard stage per (shard, stage, run, round):
    a store upgraded mid-job keeps its unfinished work, as pending shard stages the
    reconciler re-drives, and its finished stage runs as they were; a downgrade turns them
    back into a pending row per item."""
    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade

    url = empty_store_url
    upgrade(url, "0005")
    engine = get_engine(url)
    now = "2026-12-01 00:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(sa.text("insert into tenants (id, created_at) values ('t', :now)"),
                     {"now": now})
        conn.execute(sa.text(
            "insert into shards (id, run, lane, start_stage, request_ids, created_at) "
            "values ('shd-1', 0, 'batch', 'router', '[\"r1\", \"r2\", \"r3\"]', :now)"),
            {"now": now})
        for rid in ("r1", "r2", "r3"):
            conn.execute(sa.text(
                "insert into requests (id, custom_id, tenant_id, grants, kind, payload, "
                "lane, status, run, pinned_versions, drift_policy, citations, "
                "prompt_tokens, completion_tokens, created_at, admitted_at) values "
                "(:id, :id, 't', '[]', 'answer', '{}', 'batch', 'running', 0, '{}', "
                "'follow', '[]', 0, 0, :now, :now)"), {"id": rid, "now": now})
        rows = [("r1", "router", "done", 1), ("r2", "router", "done", 1),
                ("r3", "router", "done", 1), ("r1", "retrieval", "running", 2),
                ("r2", "retrieval", "pending", 0)]
        for rid, stage, status, deliveries in rows:
            conn.execute(sa.text(
                "insert into stage_runs (request_id, shard_id, stage, run, round, status, "
                "deliveries, redrives, created_at) values "
                "(:rid, 'shd-1', :stage, 0, 0, :status, :deliveries, 0, :now)"),
                {"rid": rid, "stage": stage, "status": status, "deliveries": deliveries,
                 "now": now})
    command.upgrade(alembic_config(url), "head")
    stages = sa.table("shard_stages", sa.column("shard_id"), sa.column("stage"),
                      sa.column("status"), sa.column("deliveries"),
                      sa.column("request_ids", sa.JSON()))
    with engine.connect() as conn:
        moved = conn.execute(sa.select(stages)).all()
        runs = conn.execute(sa.text("select request_id, stage, status from stage_runs "
                                    "order by id")).all()
    assert [(s.shard_id, s.stage, s.status, s.deliveries) for s in moved] == [
        ("shd-1", "retrieval", "pending", 2)]
    assert sorted(moved[0].request_ids) == ["r1", "r2"]
    assert [tuple(r) for r in runs] == [("r1", "router", "done"), ("r2", "router", "done"),
                                        ("r3", "router", "done")]
    command.downgrade(alembic_config(url), "0005")
    with engine.connect() as conn:
        restored = conn.execute(sa.text(
            "select request_id, stage, status, deliveries from stage_runs "
            "where status <> 'done' order by request_id")).all()
    assert [tuple(r) for r in restored] == [("r1", "retrieval", "pending", 2),
                                            ("r2", "retrieval", "pending", 2)]


@pytest.mark.integration
def test_the_append_only_rows_lose_their_foreign_keys_and_a_downgrade_restores_them(
        empty_store_url: str) -> None:
    """0007 drops the referential checks of stage_runs and audit_events (both backends), and
    a downgrade to 0006 puts the constraints back."""
    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade

    url = empty_store_url
    upgrade(url)
    engine = get_engine(url)

    def foreign_keys() -> dict[str, list[str]]:
        inspector = sa.inspect(engine)
        return {t: sorted(str(k["name"]) for k in inspector.get_foreign_keys(t))
                for t in ("stage_runs", "audit_events")}

    assert foreign_keys() == {"stage_runs": [], "audit_events": []}
    command.downgrade(alembic_config(url), "0006")
    engine.dispose()
    assert foreign_keys() == {
        "stage_runs": ["fk_stage_runs_request_id_requests", "fk_stage_runs_shard_id_shards"],
        "audit_events": ["fk_audit_events_request_id_requests"]}


@pytest.mark.integration
def test_requests_lose_their_foreign_keys_and_a_downgrade_restores_them(
        empty_store_url: str) -> None:
    """0013 drops the referential checks of requests on jobs and tenants (both backends), a
    downgrade to 0012 puts them back, and admission still records the job and the tenant."""
    import sqlalchemy as sa
    from alembic import command

    from schemas.requests import RequestLine
    from schemas.status import DriftPolicy
    from schemas.versions import VersionTuple
    from workers.store.admission import admit_one
    from workers.store.engine import get_engine, session_scope
    from workers.store.migrate import alembic_config, upgrade
    from workers.store.models import Request, Tenant

    url = empty_store_url
    upgrade(url)
    engine = get_engine(url)

    def foreign_keys() -> list[str]:
        return sorted(str(k["name"]) for k in sa.inspect(engine).get_foreign_keys("requests"))

    assert foreign_keys() == []
    line = RequestLine.model_validate({"custom_id": "fk-1", "tenant": "newco", "grants": [],
                                       "request": {"kind": "answer", "question": "Why?"}})
    with session_scope(url) as session:
        request_id, _ = admit_one(session, line, VersionTuple(
            model="m", prompt="p", router="r", index="i", tool_schemas="t", validators="v",
            decoding="d", runtime="rt"), DriftPolicy.STRICT)
    with session_scope(url) as session:
        assert session.get_one(Request, request_id).tenant_id == "newco"
        assert session.get(Tenant, "newco") is not None  # upserted with the request
    command.downgrade(alembic_config(url), "0012")
    engine.dispose()
    assert foreign_keys() == ["fk_requests_job_id_jobs", "fk_requests_tenant_id_tenants"]


@pytest.mark.integration
def test_request_status_leaves_the_rewritten_indexes_and_failures_keep_a_partial_one(
        empty_store_url: str) -> None:
    """0008 (both backends): status is in no index but a partial one of failed requests; a
    job's requests are found by job_id; a downgrade to 0007 restores the status indexes.
    (0012 replaces the partial index.)"""
    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade

    url = empty_store_url
    upgrade(url, "0010")
    engine = get_engine(url)

    def indexes() -> dict[str, list[str]]:
        return {str(i["name"]): list(i["column_names"])
                for i in sa.inspect(engine).get_indexes("requests")
                if not str(i["name"]).startswith("uq_")}

    assert indexes() == {"ix_requests_job": ["job_id"], "ix_requests_failed": ["finished_at"]}
    with engine.connect() as conn:
        predicate = conn.execute(sa.text(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
            "WHERE indexrelid = 'ix_requests_failed'::regclass") if engine.dialect.name ==
            "postgresql" else sa.text(
            "SELECT sql FROM sqlite_master WHERE name = 'ix_requests_failed'")).scalar_one()
    assert "status" in predicate and "failed" in predicate
    command.downgrade(alembic_config(url), "0007")
    engine.dispose()
    assert indexes() == {"ix_requests_job_status": ["job_id", "status"],
                         "ix_requests_status": ["status"]}


@pytest.mark.integration
def test_served_versions_move_to_one_row_per_tuple_and_a_downgrade_puts_them_back(
        empty_store_url: str) -> None:
    """0009 (both backends): each distinct served tuple becomes one version_tuples row with
    the application's id, each stage run names its tuple, a run without one names none; a
    downgrade to 0008 writes the JSON back on every row."""
    import json

    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade
    from workers.store.tuples import versions_id

    url = empty_store_url
    upgrade(url, "0008")
    engine = get_engine(url)
    old = {"model": "m0", "prompt": "p", "router": "r", "index": "i", "tool_schemas": "t",
           "validators": "v", "decoding": "d", "runtime": "rt é"}
    new = {**old, "model": "m1"}
    served = {"r1": old, "r2": new, "r3": old, "r4": None}
    with engine.begin() as conn:
        for rid, versions in served.items():
            conn.execute(sa.text(
                "insert into stage_runs (request_id, shard_id, stage, run, round, status, "
                "deliveries, created_at, served_versions) values (:rid, 'shd-1', 'router', "
                "0, 0, 'done', 1, '2026-12-01 00:00:00+00:00', :served)"),
                {"rid": rid, "served": None if versions is None else json.dumps(versions)})
    command.upgrade(alembic_config(url), "head")
    with engine.connect() as conn:
        named = dict(conn.execute(sa.text(
            "select request_id, served_versions_id from stage_runs")).all())
        stored = {row.id: row.versions if isinstance(row.versions, dict)
                  else json.loads(row.versions) for row in conn.execute(sa.text(
                      "select id, versions from version_tuples"))}
    assert named == {"r1": versions_id(old), "r2": versions_id(new), "r3": versions_id(old),
                     "r4": None}
    assert stored == {versions_id(old): old, versions_id(new): new}
    command.downgrade(alembic_config(url), "0008")
    engine.dispose()
    with engine.connect() as conn:
        back = {rid: (v if isinstance(v, dict) or v is None else json.loads(v))
                for rid, v in conn.execute(sa.text(
                    "select request_id, served_versions from stage_runs")).all()}
        tables = sa.inspect(conn).get_table_names()
    assert back == served
    assert "version_tuples" not in tables


@pytest.mark.integration
def test_pinned_versions_move_to_version_tuples_and_a_downgrade_puts_them_back(
        empty_store_url: str) -> None:
    """0010 (both backends): each distinct pin becomes one version_tuples row with the
    application's id (joining a tuple already stored for stage runs), each request names
    its pin; a downgrade to 0009 writes the JSON back on every request."""
    import json

    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade
    from workers.store.tuples import versions_id

    url = empty_store_url
    upgrade(url, "0009")
    engine = get_engine(url)
    now = "2026-12-01 00:00:00+00:00"
    old = {"model": "m0", "prompt": "p", "router": "r", "index": "i", "tool_schemas": "t",
           "validators": "v", "decoding": "d", "runtime": "rt é"}
    new = {**old, "model": "m1"}
    pinned = {"r1": old, "r2": new, "r3": old}
    with engine.begin() as conn:
        conn.execute(sa.text("insert into tenants (id, created_at) values ('t', :now)"),
                     {"now": now})
        conn.execute(sa.text("insert into version_tuples (id, versions, created_at) "
                             "values (:id, :versions, :now)"),
                     {"id": versions_id(old), "versions": json.dumps(old), "now": now})
        for rid, versions in pinned.items():
            conn.execute(sa.text(
                "insert into requests (id, custom_id, tenant_id, grants, kind, payload, "
                "lane, status, run, pinned_versions, drift_policy, citations, "
                "prompt_tokens, completion_tokens, created_at, admitted_at) values "
                "(:id, :id, 't', '[]', 'answer', '{}', 'batch', 'queued', 0, :pin, "
                "'follow', '[]', 0, 0, :now, :now)"),
                {"id": rid, "pin": json.dumps(versions), "now": now})
    command.upgrade(alembic_config(url), "head")
    with engine.connect() as conn:
        named = dict(conn.execute(sa.text("select id, pinned_versions_id from requests")).all())
        stored = {row.id: row.versions if isinstance(row.versions, dict)
                  else json.loads(row.versions) for row in conn.execute(sa.text(
                      "select id, versions from version_tuples"))}
        nullable = {c["name"]: c["nullable"] for c in sa.inspect(conn).get_columns("requests")}
    assert named == {"r1": versions_id(old), "r2": versions_id(new), "r3": versions_id(old)}
    assert stored == {versions_id(old): old, versions_id(new): new}
    assert nullable["pinned_versions_id"] is False and "pinned_versions" not in nullable
    command.downgrade(alembic_config(url), "0009")
    engine.dispose()
    with engine.connect() as conn:
        back = {rid: v if isinstance(v, dict) else json.loads(v) for rid, v in conn.execute(
            sa.text("select id, pinned_versions from requests")).all()}
        columns = {c["name"] for c in sa.inspect(conn).get_columns("requests")}
    assert back == pinned
    assert "pinned_versions_id" not in columns


@pytest.mark.integration
def test_failures_move_to_failed_at_and_the_status_updates_change_no_indexed_column(
        empty_store_url: str) -> None:
    """0012 (both backends): failed requests get failed_at = finished_at, the others none;
    the one partial index names failed_at only, so no column a status update changes is
    indexed; requests leave half of each page free on Postgres; a downgrade to 0010 puts
    the index on status back and drops the column."""
    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade

    url = empty_store_url
    postgres = url.startswith("postgresql")
    upgrade(url, "0010")
    engine = get_engine(url)
    ended = {"r1": ("failed", "2026-12-01 10:00:00+00:00"),
             "r2": ("succeeded", "2026-12-01 11:00:00+00:00"), "r3": ("running", None)}
    with engine.begin() as conn:
        conn.execute(sa.text("insert into tenants (id, created_at) values ('t', '2026-12-01')"))
        for rid, (status, finished) in ended.items():
            conn.execute(sa.text(
                "insert into requests (id, custom_id, tenant_id, grants, kind, payload, "
                "lane, status, run, pinned_versions_id, drift_policy, citations, "
                "prompt_tokens, completion_tokens, created_at, admitted_at, finished_at) "
                "values (:id, :id, 't', '[]', 'answer', '{}', 'batch', :status, 0, 'vt', "
                "'follow', '[]', 0, 0, '2026-12-01', '2026-12-01', :finished)"),
                {"id": rid, "status": status, "finished": finished})

    def indexes() -> dict[str, list[str]]:
        return {str(i["name"]): list(i["column_names"])
                for i in sa.inspect(engine).get_indexes("requests")
                if not str(i["name"]).startswith("uq_")}

    def predicate(name: str) -> str:
        with engine.connect() as conn:
            return str(conn.execute(sa.text(
                f"SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
                f"WHERE indexrelid = '{name}'::regclass") if postgres else sa.text(
                f"SELECT sql FROM sqlite_master WHERE name = '{name}'")).scalar_one())

    command.upgrade(alembic_config(url), "0012")
    engine.dispose()
    with engine.connect() as conn:
        failed = {rid: at is not None for rid, at in conn.execute(sa.text(
            "select id, failed_at from requests")).all()}
        same = conn.execute(sa.text(
            "select failed_at = finished_at from requests where id = 'r1'")).scalar_one()
        options = conn.execute(sa.text(
            "select reloptions from pg_class where relname = 'requests'")).scalar_one() \
            if postgres else None
    assert failed == {"r1": True, "r2": False, "r3": False} and same
    assert indexes() == {"ix_requests_job": ["job_id"], "ix_requests_failed_at": ["failed_at"]}
    where = predicate("ix_requests_failed_at")
    assert "failed_at" in where and "status" not in where and "finished_at" not in where
    if postgres:
        assert options == ["fillfactor=50"]
    command.downgrade(alembic_config(url), "0010")
    engine.dispose()
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("requests")}
    assert "failed_at" not in columns
    assert indexes() == {"ix_requests_job": ["job_id"], "ix_requests_failed": ["finished_at"]}
    assert "status" in predicate("ix_requests_failed")


@pytest.mark.integration
def test_a_store_that_ran_the_withdrawn_0011_upgrades_to_the_indexes_of_head(
        empty_store_url: str) -> None:
    """0011, 0012 (both backends): a store left by the 0011 that was withdrawn (ix_requests_job
    replaced by ix_requests_job_status, alembic_version 0011) upgrades to head and ends with
    the same indexes as a store that never ran it."""
    import sqlalchemy as sa
    from alembic import command

    from workers.store.engine import get_engine
    from workers.store.migrate import alembic_config, upgrade

    url = empty_store_url
    upgrade(url, "0010")
    engine = get_engine(url)
    with engine.begin() as conn:  # what the withdrawn 0011 did
        conn.execute(sa.text("CREATE INDEX ix_requests_job_status ON requests (job_id, status)"))
        conn.execute(sa.text("DROP INDEX ix_requests_job"))
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0011'"))
    command.upgrade(alembic_config(url), "head")
    engine.dispose()
    indexes = {str(i["name"]): list(i["column_names"])
               for i in sa.inspect(engine).get_indexes("requests")
               if not str(i["name"]).startswith("uq_")}
    assert indexes == {"ix_requests_job": ["job_id"], "ix_requests_failed_at": ["failed_at"]}
