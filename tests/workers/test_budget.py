"""The generation budget of a shard: one short deadline never cuts its neighbours short."""

from __future__ import annotations

from datetime import timedelta

import pytest

from workers.base import _budget_s
from workers.store.timeutil import utcnow

pytestmark = [pytest.mark.unit]


def test_an_item_without_a_deadline_leaves_the_shard_unbounded() -> None:
    assert _budget_s([utcnow() + timedelta(seconds=1), None]) is None


def test_every_item_with_a_deadline_bounds_the_shard_by_the_latest() -> None:
    now = utcnow()
    budget = _budget_s([now + timedelta(seconds=5), now + timedelta(seconds=60)])
    assert budget is not None and 50 < budget <= 60


def test_a_passed_deadline_gives_no_time() -> None:
    assert _budget_s([utcnow() - timedelta(seconds=5)]) == 0.0
