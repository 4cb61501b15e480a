"""A Mercure subscriber's ``text/event-stream``: Herald's :class:`~api.core.stream.EventStreamResponse`, Mercure-opened.

The writer, the replay batching, the hand-off to live updates, direct writes,
heartbeats and disconnect handling are Herald's own. What differs: the
stream is opened by :meth:`api.mercure.dispatch.MercureHub.open` (while the
broker is unavailable too), and when it ends the subscriber is also
unregistered from the Mercure dispatcher. With active subscriptions on, the
stream's subscriptions start when its answer starts and end when it ends
(:mod:`api.mercure.subscriptions`: this only queues).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import Receive, Scope, Send

from api.core.hub import Opened
from api.core.sse import HEARTBEAT
from api.core.stream import EventStreamResponse
from api.mercure.dispatch import MercureHub, Subscriber
from api.mercure.subscriptions import ActiveSubscriptions, Subscription
from broker.base import BrokerUnavailable

_WAIT_STEP = 0.5
"""Seconds between two attempts to open a stream while the broker is unavailable."""


class MercureStreamResponse(EventStreamResponse):
    """Streams a Mercure subscriber until its connection closes."""

    def __init__(
        self,
        mercure: MercureHub,
        subscriber: Subscriber,
        opened: Opened | None,
        *,
        retry_ms: int,
        heartbeat: float,
        tracker: ActiveSubscriptions | None = None,
        subscriptions: tuple[Subscription, ...] = (),
    ) -> None:
        super().__init__(
            mercure.hub, subscriber.connection, opened, resume=None, retry_ms=retry_ms, heartbeat=heartbeat
        )
        self._mercure = mercure
        self._subscriber = subscriber
        self._tracker = tracker
        self._subscriptions = subscriptions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracker = self._tracker
        if tracker is not None:  # "Subscription Events": the subscriptions exist while the answer streams
            tracker.started(self._subscriptions)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._mercure.forget(self._subscriber)
            if tracker is not None:
                tracker.ended(self._subscriptions)

    async def _wait_and_open(self, send: Send) -> Opened | None:
        """Keep the stream (and its heartbeats) up until it can be opened; None if it closed first.

        Only a subscriber that did not resume waits (a resume must answer
        ``Mercure-Last-Event-ID`` in its headers, so it is told to come back).
        """
        hub, connection = self._hub, self._connection
        hub.waited_for_broker += 1
        step = min(_WAIT_STEP, self._heartbeat / 2)
        quiet_since = time.monotonic()
        while connection.closed is None:
            if await hub.wait_for_broker(step) and connection.closed is None:
                try:
                    return (await self._mercure.open(self._subscriber, None)).opened
                except BrokerUnavailable:
                    await asyncio.sleep(step)  # the reconnect delay of a stream waiting for the broker
            if time.monotonic() - quiet_since >= self._heartbeat and connection.closed is None:
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                quiet_since = time.monotonic()
        return None
