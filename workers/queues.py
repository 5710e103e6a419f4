"""Queues per stage and lane, and the Celery app on them for given settings: delivery
guarantees, per-queue time limits. Importing it reads no settings (`workers.app` does)."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from schemas.status import Lane, Stage
from workers import broker
from workers.settings import EMBEDDED_BROKER_SCHEME, Settings

TASK_NAMES = {stage: f"sluice.{stage.value}" for stage in Stage}


def queue_name(stage: Stage, lane: Lane) -> str:
    return f"{stage.value}.{lane.value}"


def stage_queues(stage: Stage) -> list[str]:
    """The queues one stage's workers consume, online first."""
    return [queue_name(stage, Lane.ONLINE), queue_name(stage, Lane.BATCH)]


def create_app(settings: Settings) -> Celery:
    broker.register()
    app = Celery("sluice", broker=settings.broker_url, include=["tasks.queue_tasks"])
    app.conf.update(
        task_queues=[Queue(q) for stage in Stage for q in stage_queues(stage)],
        task_default_queue=queue_name(Stage.ROUTER, Lane.BATCH),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # A task killed mid-run must come back, not vanish or be acked as failed.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        task_annotations={TASK_NAMES[s]: _limits(settings, s) for s in Stage},
    )
    return app


def _transport_options(settings: Settings) -> dict[str, object]:
    if settings.broker_url.startswith(EMBEDDED_BROKER_SCHEME):
        return {}  # forwarded to create_engine by kombu's SQLAlchemy transport
    # Above any stage's lifetime, prefetch wait included: leases, not this, recover work.
    options: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_s,
                                  "queue_order_strategy": "priority"}
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def _limits(settings: Settings, stage: Stage) -> dict[str, float]:
    soft, hard = settings.limits.for_stage(stage)
    return {"soft_time_limit": soft, "time_limit": hard}
