"""The Celery app of this process's settings, read from the environment at import: the
module `celery -A workers.app` loads (workers, Flower) and the stage tasks register on."""

from __future__ import annotations

from workers.queues import create_app
from workers.settings import settings_from_env

app = create_app(settings_from_env())
