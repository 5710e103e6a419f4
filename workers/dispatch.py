"""Putting shards on the queues: a Celery chain from a given stage to validation."""

from __future__ import annotations

from celery import chain

from schemas.status import Stage
from workers.app import TASK_NAMES, app, queue_name
from workers.store.admission import Dispatch


def enqueue(dispatch: Dispatch) -> None:
    """One chain per shard; the message carries the hop's ids only."""
    stages = list(Stage)[list(Stage).index(dispatch.stage):]
    signatures = [app.signature(TASK_NAMES[s], queue=queue_name(s, dispatch.lane))
                  for s in stages]
    first = signatures[0].clone(args=(dispatch.hop.model_dump(),))
    chain(first, *signatures[1:]).apply_async()


def enqueue_all(dispatches: list[Dispatch]) -> None:
    for dispatch in dispatches:
        enqueue(dispatch)
