"""The cluster registry: every node announces itself in the broker, and publishes its figures.

Once a second each node

* announces itself (:class:`broker.base.NodeDirectory`: on Redis a key with a
  TTL of :data:`TTL` seconds, so a node that dies is listed as ``gone`` once
  the key expires; on the embedded broker, the node itself) with its id,
  URL, version, start time, state (``serving``, ``draining``, ``resyncing`` after
  standing still: api.node.stall) and figures;
* publishes the same figures on the reserved topic :data:`NODES_TOPIC`,
  as an event of type ``node``: the dashboard (and any operator's own page)
  is an EventSource client of it. Producers can't publish there
  (:func:`is_reserved`).

The figures are the same counters ``/metrics`` shows (api.core.metrics), so the
page and Prometheus never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from api.core.hub import Hub
from api.models import RESERVED_TOPIC_PREFIX
from api.node.stall import StallWatch
from api.settings import Settings
from broker.base import Broker, BrokerUnavailable, Message, NodeDirectory, ReportsStats

log = logging.getLogger("herald.registry")

VERSION = "0.1.0"
NODES_TOPIC = RESERVED_TOPIC_PREFIX + "nodes"
INTERVAL = 1.0
"""Seconds between two announcements (and two figure events)."""
TTL = 5.0
"""Seconds a node is listed alive after its last announcement."""
FORGET = 300.0
"""Seconds a node gone quiet is still listed (as ``gone``)."""


class NodeRegistry:
    """Announces this node and publishes its figures every :data:`INTERVAL` seconds."""

    def __init__(self, settings: Settings, broker: Broker, hub: Hub, watch: StallWatch | None = None) -> None:
        self._settings = settings
        self._watch = watch
        self._broker = broker
        self._hub = hub
        self.node_id = settings.node_id
        self.url = settings.node_url or f"http://{settings.host}:{settings.port}"
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None
        self._announcing = isinstance(broker, NodeDirectory)
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-registry")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # The last word: draining (its key expires after TTL, then the node is gone).
        self._closing = True
        with contextlib.suppress(BrokerUnavailable):
            await self.announce()

    @property
    def state(self) -> str:
        if self._hub.draining or self._closing:
            return "draining"
        if self._watch is not None and self._watch.resyncing:
            return "resyncing"  # back from standing still, not serving new streams yet (api.node.stall)
        return "serving"

    def record(self) -> dict[str, Any]:
        """This node as ``/cluster`` lists it (and as its figure events carry it)."""
        hub = self._hub
        stats = hub.stats()
        broker_stats = self._broker.stats() if isinstance(self._broker, ReportsStats) else {}
        return {
            "id": self.node_id,
            "url": self.url,
            "version": VERSION,
            "started_at": self.started_at,
            "state": self.state,
            "time": time.time(),
            "connections": stats["connections"],
            "topics": stats["topics"],
            "events_received": stats["events_in"],
            "deliveries": stats["deliveries"],
            "bytes_sent": stats["bytes_sent"],
            "cutoffs": stats["cutoffs"],
            "expired": stats["expired"],
            "resets": stats["resets"],
            "stalls": self._watch.stalls if self._watch is not None else 0,
            "broker_up": hub.broker_up and bool(broker_stats.get("feed_up", 1)),
            "feed_reconnects": max(0, broker_stats.get("feed_connects", 1) - 1),
            **hub.metrics.figures(),
            "busiest": hub.busiest(),
        }

    async def announce(self) -> dict[str, Any]:
        record = self.record()
        if self._announcing:
            assert isinstance(self._broker, NodeDirectory)
            await self._broker.announce(self.node_id, json.dumps(record, separators=(",", ":")), TTL)
        return record

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                record = await self.announce()
                data = json.dumps(record, separators=(",", ":"))
                await self._broker.publish([Message(NODES_TOPIC, data, "node")])
                if failing:
                    log.info("registry: announcing again")
                failing = False
            except BrokerUnavailable as exc:
                if not failing:
                    log.warning("registry: can't announce this node: %s", exc)
                failing = True
            await asyncio.sleep(INTERVAL)

    async def cluster(self) -> list[dict[str, Any]]:
        """Every node the broker knows (live ones, and those gone within :data:`FORGET` seconds)."""
        if not self._announcing:
            return [self.record()]
        assert isinstance(self._broker, NodeDirectory)
        nodes = []
        for entry in await self._broker.nodes(FORGET):
            try:
                record = json.loads(entry.record)
            except ValueError:
                continue
            if not entry.alive:
                record["state"] = "gone"
            record["last_seen"] = record.pop("time", None)
            nodes.append(record)
        nodes.sort(key=lambda r: str(r.get("id")))
        return nodes
