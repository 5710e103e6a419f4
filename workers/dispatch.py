"""Putting shards on the queues: a Celery chain from a given stage to validation."""

from __future__ import annotations

import threading

from celery import Celery, chain

from schemas.status import Stage
from workers.queues import TASK_NAMES, create_app, queue_name
from workers.settings import Settings
from workers.store.admission import Dispatch

_senders: dict[tuple[str, str], Celery] = {}
_senders_lock = threading.Lock()


def sender_for(settings: Settings) -> Celery:
    """A producer-side app on the settings' broker (not necessarily the environment's), one
    per broker and key prefix, built from the first settings that name them: a producer
    reads nothing else of them but the broker's transport options."""
    key = (settings.broker_url, settings.broker_key_prefix)
    with _senders_lock:
        sender = _senders.get(key)
        if sender is None:
            sender = _senders[key] = create_app(settings)
    return sender


def enqueue(dispatch: Dispatch, settings: Settings) -> None:
    """One chain per shard; the message carries the hop's ids only."""
    app = sender_for(settings)
    stages = list(Stage)[list(Stage).index(dispatch.stage):]
    signatures = [app.signature(TASK_NAMES[s], queue=queue_name(s, dispatch.lane))
                  for s in stages]
    first = signatures[0].clone(args=(dispatch.hop.model_dump(),))
    chain(first, *signatures[1:]).apply_async()


def enqueue_all(dispatches: list[Dispatch], settings: Settings) -> None:
    for dispatch in dispatches:
        enqueue(dispatch, settings)
