"""The Alembic migrations build exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

pytestmark = pytest.mark.unit


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
