"""`sluice db upgrade`: run the Alembic migrations against the configured store; and the
check that commands reading the store make first."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class StoreNotReady(RuntimeError):
    """The audit store cannot serve this code: unreachable, never migrated, or at another
    revision. The message says what to do."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def shown(database_url: str) -> str:
    """The store's URL as messages show it: without its password."""
    return make_url(database_url).render_as_string(hide_password=True)


def check_ready(database_url: str) -> None:
    """Raise StoreNotReady unless the store is reachable and at this code's newest revision.
    A SQLite store that does not exist is not created by looking at it."""
    url = make_url(database_url)
    where = shown(database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise StoreNotReady(f"no audit store at {where}: `sluice run FILE` or `sluice db "
                            "upgrade` creates it (or set SLUICE_DATA_DIR / SLUICE_DATABASE_URL "
                            "to the one you mean)")
    from workers.store.engine import get_engine

    try:
        with get_engine(database_url).connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StoreNotReady(f"cannot reach the audit store at {where}: {reason}") from None
    head, known = _revisions()
    if current == head:
        return
    if current is None:
        raise StoreNotReady(f"the audit store at {where} has no schema: run `sluice db upgrade`")
    if current in known:
        raise StoreNotReady(f"the audit store at {where} is at revision {current}, this code "
                            f"needs {head}: run `sluice db upgrade`")
    raise StoreNotReady(f"the audit store at {where} is at revision {current}, which this "
                        f"code does not know (its newest is {head}): a newer sluice migrated "
                        "it; use that one")


@cache
def _revisions() -> tuple[str, frozenset[str]]:
    """This code's newest revision and every revision it knows."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None, "the migrations have no head"
    return head, frozenset(rev.revision for rev in script.walk_revisions())
