"""Fixtures for the real services: a test database, a Redis key space, a worker fleet."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis
from sqlalchemy import text

from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL, TEST_DATABASE

REQUIRE_SERVICES = os.environ.get("SLUICE_REQUIRE_SERVICES") == "1"
T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, poll_s: float = 0.1,
               what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _services_problem() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is not reachable: {exc}"
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=2).close()
    except psycopg.Error as exc:
        return f"Postgres at {POSTGRES_ADMIN_URL} is not reachable: {exc}"
    return None


@pytest.fixture(scope="session")
def services() -> Iterator[None]:
    problem = _services_problem()
    if problem:
        if REQUIRE_SERVICES:
            pytest.fail(problem)
        pytest.skip(problem)
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{TEST_DATABASE}"')
    try:
        yield
    finally:
        _drop_database()
        _drop_redis_keys()


def _drop_database() -> None:
    from workers.settings import Settings
    from workers.store.engine import get_engine

    get_engine(Settings().database_url).dispose()
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')


def _drop_redis_keys() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = os.environ["SLUICE_BROKER_KEY_PREFIX"]
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own for one test, not migrated: SQLite (the embedded mode)
    and a fresh Postgres database (the distributed mode), which requires the services."""
    import uuid

    from workers.store.engine import get_engine

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
        yield url
        get_engine(url).dispose()
        return
    request.getfixturevalue("services")  # fails in CI, skips locally, when Postgres is down
    name = f"sluice_store_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def store_url(empty_store_url: str) -> str:
    """A migrated, empty audit store of its own for one test, on SQLite and on Postgres."""
    from workers.store.migrate import upgrade

    upgrade(empty_store_url)
    return empty_store_url


@dataclass
class Pipeline:
    """The distributed mode on this machine: Postgres, Redis, one worker per stage."""

    settings: object
    fleet: object
    log_dir: Path

    def restart(self, stage: object) -> None:
        from ops.embedded import start_worker

        self.fleet.processes[stage] = start_worker(self.settings, stage, self.log_dir)  # type: ignore[attr-defined,index]
        wait_worker_ready(self.log_dir, stage, marker_count=_ready_count(self.log_dir, stage) + 1)


def _log_text(log_dir: Path, stage: object) -> str:
    path = log_dir / f"worker-{stage.value}.log"  # type: ignore[attr-defined]
    return path.read_text(errors="replace") if path.exists() else ""


def _ready_count(log_dir: Path, stage: object) -> int:
    return _log_text(log_dir, stage).count(" ready.")


def wait_worker_ready(log_dir: Path, stage: object, marker_count: int = 1) -> None:
    wait_until(lambda: _ready_count(log_dir, stage) >= marker_count, 90, 0.2,
               f"{stage} worker to be ready")


@pytest.fixture(scope="session")
def pipeline(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    from ops.corpus import build_index, ingest_tree, seed_example_records
    from ops.embedded import WorkerFleet
    from schemas.status import Stage
    from workers.reconciler import ReconcilerThread
    from workers.settings import Settings
    from workers.store.migrate import upgrade

    data_dir = tmp_path_factory.mktemp("sluice-data")
    os.environ["SLUICE_DATA_DIR"] = str(data_dir)
    settings = Settings()
    upgrade(settings.database_url)
    ingest_tree(settings, settings.corpus_dir)
    seed_example_records(settings)
    build_index(settings)
    log_dir = data_dir / "logs"
    fleet = WorkerFleet(settings, log_dir)
    fleet.start()
    reconciler = ReconcilerThread(settings)
    try:
        for stage in Stage:
            wait_worker_ready(log_dir, stage)
        reconciler.start()
        yield Pipeline(settings, fleet, log_dir)
    finally:
        reconciler.stop()
        fleet.stop()


def wait_for_a_lock_wait(engine: Any, who: str, timeout_s: float = 30.0) -> None:
    """Return once a session of the engine's Postgres database waits on a lock: `who`, which
    the test started in a thread to meet a transaction it holds open."""
    deadline = time.monotonic() + timeout_s
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.execute(text(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and wait_event_type = 'Lock'")).scalar()
            connection.rollback()  # a fresh snapshot for the next look
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError(f"{who} never waited on a lock")


def race(count: int, work: Callable[[], T], timeout_s: float = 60.0) -> list[T]:
    """Run `work` in `count` threads released together; its results in thread order, or the
    first error raised in any of them."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def runner(slot: int) -> None:
        barrier.wait()
        try:
            results[slot] = work()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    return results
