"""`sluice db upgrade`: run the Alembic migrations against the configured store; and the
checks that commands make before they use it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class StoreNotReady(RuntimeError):
    """The audit store cannot serve this code: missing, unreachable, never migrated, or at a
    revision this code does not know. The message says what to do."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def url_for_messages(database_url: str) -> str:
    """The store's URL as messages show it: without its password."""
    return make_url(database_url).render_as_string(hide_password=True)


def upgrade_store(database_url: str) -> None:
    """Migrate the store to this code's newest revision (cheap when it is there already);
    StoreNotReady when it cannot be reached, or a newer code migrated it past what this code
    knows (downgrading it would drop what that code relies on)."""
    _check_file_store(database_url, must_exist=False)
    with _reaching(database_url):
        unknown = _current_revisions(database_url) - _known_revisions()
        if unknown:
            raise StoreNotReady(_newer(database_url, unknown))
        upgrade(database_url)


def check_ready(database_url: str) -> None:
    """StoreNotReady unless the store exists, is reachable and is at this code's newest
    revision. A SQLite store that does not exist is not created by looking at it."""
    _check_file_store(database_url, must_exist=True)
    with _reaching(database_url):
        current = _current_revisions(database_url)
    heads = _head_revisions()
    if current == heads:
        return
    unknown, where = current - _known_revisions(), url_for_messages(database_url)
    if not current:
        raise StoreNotReady(f"the audit store at {where} has no schema: run `sluice db upgrade`")
    if unknown:
        raise StoreNotReady(_newer(database_url, unknown))
    raise StoreNotReady(f"the audit store at {where} is at revision {_listed(current)}, this "
                        f"code needs {_listed(heads)}: run `sluice db upgrade`")


def _check_file_store(database_url: str, must_exist: bool) -> None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return
    where = url_for_messages(database_url)
    if url.database in (None, "", ":memory:") or url.query.get("uri") or \
            str(url.database).startswith("file:"):
        raise StoreNotReady(f"the audit store must be a SQLite file named by its path, got "
                            f"{where}: an in-memory store keeps nothing between commands")
    if must_exist and not Path(str(url.database)).exists():
        raise StoreNotReady(f"no audit store at {where}: `sluice run FILE` or `sluice db "
                            "upgrade` creates it (or set SLUICE_DATA_DIR / SLUICE_DATABASE_URL "
                            "to the one you mean)")


@contextmanager
def _reaching(database_url: str) -> Iterator[None]:
    """Any error of the database itself (refused, no such database, not a database, no
    permission) as StoreNotReady, on one line."""
    try:
        yield
    except DBAPIError as exc:
        reason = (str(exc.orig or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreNotReady(f"cannot use the audit store at {url_for_messages(database_url)}: "
                            f"{reason}") from None


def _current_revisions(database_url: str) -> frozenset[str]:
    from workers.store.engine import get_engine

    with get_engine(database_url).connect() as conn:
        return frozenset(MigrationContext.configure(conn).get_current_heads())


def _newer(database_url: str, unknown: frozenset[str]) -> str:
    return (f"the audit store at {url_for_messages(database_url)} is at revision "
            f"{_listed(unknown)}, which this code does not know (its newest is "
            f"{_listed(_head_revisions())}): a newer sluice migrated it; use that one")


def _listed(revisions: frozenset[str]) -> str:
    return ", ".join(sorted(revisions))


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def _head_revisions() -> frozenset[str]:
    return frozenset(_script().get_heads())


def _known_revisions() -> frozenset[str]:
    return frozenset(rev.revision for rev in _script().walk_revisions())
