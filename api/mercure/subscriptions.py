"""Mercure's active subscriptions ("Active Subscriptions"): subscription events and the API, for the whole cluster.

On when ``HERALD_MERCURE_SUBSCRIPTIONS=1`` (it costs broker writes per
subscription at connect and disconnect; off, nothing of this module runs).

**Subscriptions.** A subscribe request creates one subscription per topic
matcher (duplicates folded, as the spec allows), each named by its matcher
type, its matcher and the subscriber: a ``urn:uuid:`` the hub draws for the
stream, never anything the client sent. A legacy ``topic=`` selector is named
with the type ``exact`` (an exact topic or ``*``) or ``uritemplate`` (a URI
template: no 1.0 matcher type describes it).

**Events.** When a stream starts (its answer is being sent) and when it ends,
the node publishes, for each of its subscriptions, a *private* update on the
topic ``/.well-known/mercure/subscriptions/{match_type}/{match}/{subscriber}``
(each variable percent-encoded once, as RFC 6570 simple expansion does), data
the JSON-LD document with ``active`` true or false, through the hub-wide
update sequence like any update: subscribers authorized for those topics get
them, on any node, with resume.

**The list.** Every node keeps its subscriptions in the broker
(:class:`broker.base.NodeEntries`: on Redis a hash per node), written
*before* the event is published. ``GET /.well-known/mercure/subscriptions``
reads the sequence's position first, then the entries of the nodes alive
now (:class:`broker.base.NodeDirectory`): so replaying the events after the
answer's ``last_event_id`` onto its list gives the current state, and a
node that dies drops out of every list the moment the registry stops
seeing it. The first node to notice a node gone takes its entries (one
taker only) and publishes their ``active: false`` events, so a client
following the events also learns of them; a node restarting under the same
id does the same for what it held before.

Publishing never blocks a stream: streams only queue what changed, and one
task per node writes the entries and publishes the events in order, in
batches (a connect storm costs one broker round trip per batch, not per
stream). While the broker is unavailable the queue waits (bounded: past
:data:`QUEUE_LIMIT` the oldest changes are dropped, counted and logged; the
periodic rewrite of the node's entries repairs the list, the events are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote

from api.mercure.authorization import MercureGrant
from api.mercure.matchers import EXACT, LEGACY, Matcher, Matchers
from api.mercure.sequence import FeedSequence
from api.mercure.updates import EARLIEST, UPDATES_TOPIC, Update, hub_id
from broker.base import Broker, BrokerUnavailable, Message, NodeDirectory, NodeEntries

log = logging.getLogger("herald.mercure")

KIND = "mercure"
"""The broker's name for this module's entries (:class:`broker.base.NodeEntries`)."""
CONTEXT = "https://mercure.rocks/"
"""The JSON-LD ``@context`` of every document ("JSON-LD Context")."""
TEMPLATE_TYPE = "uritemplate"
"""The ``match_type`` a legacy URI-template selector is listed with."""
KEEP = 3600.0
"""Seconds a node's entries outlive its last write when no node takes them (every node gone)."""
REWRITE_EVERY = 60.0
"""Seconds between two rewrites of the node's whole set (keeps it from expiring; repairs a lost one)."""
REAP_EVERY = 2.0
"""Seconds between two looks for nodes gone with entries left."""
FORGET = 300.0
"""How long a gone node is still looked at (the registry's own horizon)."""
QUEUE_LIMIT = 100_000
"""Changes waiting for the broker at most; past it the oldest are dropped."""
RETRY_DELAY = 1.0
"""Seconds before a batch the broker refused is tried again."""
BATCH = 1000
"""Changes written and published in one round trip at most."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscription: a matcher of one subscriber ("Subscription Events")."""

    match_type: str
    match: str
    subscriber: str
    payload: dict[str, Any] | None = None

    def topic(self, hub_path: str) -> str:
        """The topic of its events, also its ``id`` and the path of its API resource."""
        return f"{hub_path}/subscriptions/{_expand(self.match_type)}/{_expand(self.match)}/{_expand(self.subscriber)}"

    def document(self, hub_path: str, *, active: bool) -> dict[str, Any]:
        """Its JSON-LD document (without ``@context`` inside a collection, which carries it)."""
        document: dict[str, Any] = {
            "id": self.topic(hub_path),
            "type": "Subscription",
            "match_type": self.match_type,
            "match": self.match,
            "subscriber": self.subscriber,
            "active": active,
        }
        if self.payload is not None:
            document["payload"] = self.payload
        return document

    def update(self, hub_path: str, *, active: bool) -> Update:
        """Its subscription event: private, on its own topic, the document with ``@context``."""
        document = {"@context": CONTEXT, **self.document(hub_path, active=active)}
        return Update((self.topic(hub_path),), _json(document), private=True)

    def entry(self) -> str:
        """What the broker keeps of it."""
        entry: dict[str, Any] = {"t": self.match_type, "m": self.match, "s": self.subscriber}
        if self.payload is not None:
            entry["p"] = self.payload
        return _json(entry)

    @classmethod
    def from_entry(cls, text: str) -> Subscription | None:
        try:
            entry = json.loads(text)
            payload = entry.get("p")
            payload = payload if isinstance(payload, dict) else None
            return cls(str(entry["t"]), str(entry["m"]), str(entry["s"]), payload)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # not written by this module: skipped


def _expand(value: str) -> str:
    """RFC 6570 simple expansion of one variable: everything but unreserved characters percent-encoded, once."""
    return quote(value, safe="")


def _json(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def match_type_of(matcher: Matcher) -> str:
    """The ``match_type`` a matcher is listed under (legacy selectors: ``exact`` or ``uritemplate``)."""
    if matcher.type != LEGACY:
        return matcher.type
    return EXACT if matcher.is_exact or matcher.wildcard else TEMPLATE_TYPE


def subscriptions_of(matchers: Matchers, grant: MercureGrant | None) -> tuple[Subscription, ...]:
    """The subscriptions a subscribe request creates: one per matcher, one new subscriber id for all."""
    subscriber = uuid.uuid4().urn
    return tuple(
        Subscription(
            match_type_of(m), m.value, subscriber, grant.subscription_payload(m) if grant is not None else None
        )
        for m in matchers
    )


class ActiveSubscriptions:
    """This node's part of the active-subscriptions feature: its entries, its events, and the reaping of gone nodes.

    :meth:`started` and :meth:`ended` are called by the streams (no await:
    they only queue); :meth:`start` and :meth:`close` by the app's lifespan
    (close after the streams ended, before the broker closes, so their
    ``active: false`` events go out).
    """

    def __init__(self, broker: Broker, node_id: str, hub_path: str) -> None:
        self.broker = broker
        self.node_id = node_id
        self.hub_path = hub_path
        self.entries = broker if isinstance(broker, NodeEntries) else None
        self.directory = broker if isinstance(broker, NodeDirectory) else None
        self._local: dict[str, Subscription] = {}  # topic -> subscription, of this node's open streams
        self._queue: deque[tuple[bool, Subscription]] = deque()
        self._in_flight = 0  # changes at the queue's head being written now
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0
        """Changes dropped because the queue was full (the broker unavailable for long)."""
        self.published = 0
        """Subscription events published by this node (its own, and those of gone nodes it took)."""

    @property
    def available(self) -> bool:
        """Can this broker hold a cluster-wide list (both brokers can; a foreign one may not)."""
        return self.entries is not None and self.directory is not None

    # -- the streams' side ----------------------------------------------------------------------------

    def started(self, subscriptions: Iterable[Subscription]) -> None:
        self._change(True, subscriptions)

    def ended(self, subscriptions: Iterable[Subscription]) -> None:
        self._change(False, subscriptions)

    def _change(self, active: bool, subscriptions: Iterable[Subscription]) -> None:
        for subscription in subscriptions:
            topic = subscription.topic(self.hub_path)
            if active:
                self._local[topic] = subscription
            else:
                self._local.pop(topic, None)
            self._queue.append((active, subscription))
        while len(self._queue) > QUEUE_LIMIT:
            self._queue.popleft()
            if self._in_flight:
                self._in_flight -= 1  # it was in the batch being written: that write still happens
            self.dropped += 1
            if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
                log.warning("mercure subscriptions: %d changes dropped while the broker was unavailable", self.dropped)
        self._idle.clear()
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.available:
            log.warning("mercure subscriptions: the broker keeps no node entries; the feature is off")
            return
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="herald-mercure-subscriptions"),
            asyncio.create_task(self._maintain_forever(), name="herald-mercure-subscriptions-reaper"),
        ]

    async def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued (for up to ``timeout`` seconds), then stop."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
                self._in_flight = len(batch)
                try:
                    await self._write(batch)
                except BrokerUnavailable as exc:
                    log.warning("mercure subscriptions: broker unavailable (%s); retrying", exc)
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                finally:
                    written, self._in_flight = self._in_flight, 0
                for _ in range(written):  # what is left of the batch at the queue's head (overflow may have cut it)
                    self._queue.popleft()
            self._idle.set()

    async def _write(self, batch: Sequence[tuple[bool, Subscription]]) -> None:
        """Entries first, then the events (in order): a list read after an event's position includes it."""
        assert self.entries is not None
        puts: dict[str, str] = {}
        drops: set[str] = set()
        for active, subscription in batch:
            topic = subscription.topic(self.hub_path)
            if active:
                puts[topic] = subscription.entry()
                drops.discard(topic)
            else:
                puts.pop(topic, None)
                drops.add(topic)
        if puts:
            await self.entries.put_entries(self.node_id, KIND, puts, KEEP)
        if drops:
            await self.entries.drop_entries(self.node_id, KIND, drops, KEEP)
        await self._publish([s.update(self.hub_path, active=a) for a, s in batch])

    async def _publish(self, updates: Sequence[Update]) -> None:
        for start in range(0, len(updates), BATCH):
            chunk = updates[start : start + BATCH]
            await self.broker.publish([Message(UPDATES_TOPIC, u.encode()) for u in chunk])
            self.published += len(chunk)

    async def _maintain_forever(self) -> None:
        """Take over the entries of gone nodes (and this node's own from before a restart); keep ours fresh."""
        own_taken = False
        since_rewrite = 0.0
        while True:
            try:
                if not own_taken:
                    await self._end(await self._take(self.node_id, keep_local=True))
                    own_taken = True
                    since_rewrite = REWRITE_EVERY  # and write ours at once
                await self._reap()
                if since_rewrite >= REWRITE_EVERY:
                    assert self.entries is not None
                    local = {topic: s.entry() for topic, s in self._local.items()}
                    await self.entries.put_entries(self.node_id, KIND, local, KEEP)
                    since_rewrite = 0.0
            except BrokerUnavailable as exc:
                log.debug("mercure subscriptions: reaping postponed: %s", exc)
            await asyncio.sleep(REAP_EVERY)
            since_rewrite += REAP_EVERY

    async def _take(self, node_id: str, *, keep_local: bool = False) -> list[Subscription]:
        assert self.entries is not None
        taken = await self.entries.take_entries(node_id, KIND)
        found = [s for s in map(Subscription.from_entry, taken.values()) if s is not None]
        if keep_local:  # what this node holds now was written after it started: not from before
            found = [s for s in found if s.topic(self.hub_path) not in self._local]
            if self._local:
                local = {topic: s.entry() for topic, s in self._local.items()}
                await self.entries.put_entries(self.node_id, KIND, local, KEEP)
        return found

    async def _reap(self) -> None:
        assert self.directory is not None
        for node in await self.directory.nodes(FORGET):
            if not node.alive and node.node_id != self.node_id:
                ended = await self._take(node.node_id)
                if ended:
                    log.info("mercure subscriptions: node %s is gone; %d subscriptions ended", node.node_id, len(ended))
                    await self._end(ended)

    async def _end(self, subscriptions: Sequence[Subscription]) -> None:
        if subscriptions:
            await self._publish([s.update(self.hub_path, active=False) for s in subscriptions])

    # -- the API's side -------------------------------------------------------------------------------

    async def listing(self) -> tuple[str, list[Subscription]]:
        """The ``last_event_id`` and the active subscriptions of the nodes alive now. Raises BrokerUnavailable.

        The position is read first: an event after it may already be in the
        list (applying it again changes nothing), and every event at or
        before it is.
        """
        assert self.entries is not None
        assert self.directory is not None
        _, position = await FeedSequence(self.broker, UPDATES_TOPIC).position()
        alive = {n.node_id for n in await self.directory.nodes(FORGET) if n.alive} | {self.node_id}
        held = await self.entries.entries(KIND, sorted(alive))
        found: list[Subscription] = []
        for node_id in sorted(held):
            found.extend(s for s in map(Subscription.from_entry, held[node_id].values()) if s is not None)
        found.sort(key=lambda s: (s.match_type, s.match, s.subscriber))
        return (hub_id(position) if position > 0 else EARLIEST), found


Selection = tuple[Literal["all", "matcher", "one"], tuple[str, ...]]


def parse_api_path(path: str, hub_path: str) -> Selection | None:
    """Which resource of the subscription API a (still percent-encoded) path names; None: none (404).

    ``{hub}/subscriptions``, ``{hub}/subscriptions/{match_type}/{match}``,
    ``{hub}/subscriptions/{match_type}/{match}/{subscriber}``; each variable
    is one path segment, percent-decoded once.
    """
    base = f"{hub_path}/subscriptions"
    if path == base:
        return ("all", ())
    if not path.startswith(base + "/"):
        return None
    segments = tuple(unquote(s, errors="strict") for s in path[len(base) + 1 :].split("/"))
    if any(not s for s in segments):
        return None
    if len(segments) == 2:
        return ("matcher", segments)
    if len(segments) == 3:
        return ("one", segments)
    return None


def select(selection: Selection, subscriptions: Iterable[Subscription]) -> list[Subscription]:
    kind, values = selection
    if kind == "all":
        return list(subscriptions)
    return [s for s in subscriptions if (s.match_type, s.match, s.subscriber)[: len(values)] == values]
