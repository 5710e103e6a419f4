"""Shared fixtures. Integration tests run on real Redis, Postgres, Celery workers and models.

They skip when those services are absent on a developer's machine, and fail instead when
SLUICE_REQUIRE_SERVICES=1 (set by .ci/run), so CI never counts a missing service as a pass.
The Celery app reads its settings at import, so this module points SLUICE_* at the test
database and Redis key space before any test module imports it.
"""

from __future__ import annotations

import os
import uuid

RUN_ID = uuid.uuid4().hex[:10]
TEST_DATABASE = f"sluice_test_{RUN_ID}"
POSTGRES_ADMIN_URL = os.environ.get("SLUICE_TEST_POSTGRES_URL",
                                    "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.update({
    "SLUICE_DATABASE_URL": POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{TEST_DATABASE}",
    "SLUICE_BROKER_URL": REDIS_URL,
    "SLUICE_BROKER_KEY_PREFIX": f"sluice-test-{RUN_ID}:",
    "SLUICE_MAX_NEW_TOKENS": "40",
    "SLUICE_LEASE_S": "6",
    "SLUICE_RECONCILE_INTERVAL_S": "1",
    "SLUICE_STALL_S": "120",
    "SLUICE_SHARD_SIZE": "4",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
})

pytest_plugins = ["tests.services"]
