"""Node metrics for Prometheus: what the hub and the routes count, and how ``GET /metrics`` shows it.

The hot path does not call into Prometheus. The figures that change per event
or per client write are plain integers the hub, its connections and the
broker keep anyway (:class:`WriteTally`, :meth:`api.core.hub.Hub.stats`,
``broker.stats()``); a :class:`NodeCollector` reads them when Prometheus
scrapes. What is *observed* rather than counted (publish durations, the
time from publish to the socket write) goes into histograms once per
publish request and once per event per flush, never per client.

:class:`Metrics` is the small interface the rest of the node calls;
:class:`NullMetrics` does nothing (``HERALD_METRICS=0``, and the default for
a hub built without one), :class:`PrometheusMetrics` records into a registry
of its own: nothing is registered globally, so every app (every test
server) has its own figures.

Conventions: ``herald_`` prefix, base units (seconds, bytes), ``_total``
counters, and no per-topic or per-client label (their number has no bound;
per-topic figures are the dashboard's business).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.base import ResetReason

CONNECT_OUTCOMES = (
    "accepted",  # a stream opened at once
    "waited",  # a stream opened while the broker was down: it waits for it
    "retry_draining",  # told to come back: the node is shutting down
    "retry_full",  # told to come back: HERALD_MAX_CONNECTIONS reached
    "retry_keys",  # told to come back: the token keys can't be fetched now
    "retry_broker",  # told to come back: the broker is down and a Mercure resume must name its cursor
    "bad_request",  # 400: no topic, a bad topic name, too many topics
    "unauthorized",  # 401: no usable token
    "forbidden",  # 403: the token does not cover a topic
)

PUBLISH_ERROR_CLASSES = ("4xx", "5xx")
"""The ``status`` label values of ``herald_publish_errors_total``."""

RESET_REASONS: tuple[str, ...] = tuple(value for name, value in vars(ResetReason).items() if name.isupper())
"""Every :class:`~broker.base.ResetReason`: the ``reason`` label values of ``herald_resets_total``."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_MAX_PENDING_LATENCIES = 10_000
"""Event ids held for the next flush's latency observations at most (then sampled)."""


class WriteTally:
    """What this node wrote to clients' sockets: added to once per write (a flush covers many events)."""

    __slots__ = ("bytes", "events", "replayed")

    def __init__(self) -> None:
        self.events = 0
        """Events written to clients (one event to 1,000 clients is 1,000)."""
        self.bytes = 0
        """Bytes of stream body written (events, replays, heartbeats, notices)."""
        self.replayed = 0
        """Events written as part of a resume's replay (also in ``events``)."""


class Metrics(Protocol):
    """What the node tells its metrics. Every method is cheap and never raises."""

    tally: WriteTally

    def connect(self, outcome: str) -> None:
        """A ``GET /events`` or a Mercure subscribe ended its connect with ``outcome`` (:data:`CONNECT_OUTCOMES`)."""

    def published(self, events: int, seconds: float) -> None:
        """A publish request was accepted: ``events`` events in ``seconds`` (request to answer)."""

    def publish_failed(self, status: int) -> None:
        """A publish request was refused or failed with HTTP ``status``."""

    def flushed(self, event_ids: Sequence[int], now: float) -> None:
        """A flush wrote these events (ids are publish times in microseconds) to every ready client at ``now``."""

    def figures(self) -> dict[str, float | int | None]:
        """What the dashboard shows from these metrics (the same counts as ``/metrics``)."""


class NullMetrics:
    """Counts nothing (``HERALD_METRICS=0``); only the writes are tallied (the hub's own figures)."""

    def __init__(self) -> None:
        self.tally = WriteTally()

    def connect(self, outcome: str) -> None:
        return None

    def published(self, events: int, seconds: float) -> None:
        return None

    def publish_failed(self, status: int) -> None:
        return None

    def flushed(self, event_ids: Sequence[int], now: float) -> None:
        return None

    def figures(self) -> dict[str, float | int | None]:
        return {}


class PrometheusMetrics:
    """Counts into plain integers and two histograms; :meth:`expose` renders them (and every
    attached collector's figures) from a :class:`CollectorRegistry` of its own."""

    def __init__(self) -> None:
        self.tally = WriteTally()
        self.connects = dict.fromkeys(CONNECT_OUTCOMES, 0)
        self.events_published = 0
        self.publish_errors = dict.fromkeys(PUBLISH_ERROR_CLASSES, 0)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._publish_duration = Histogram(
            "herald_publish_duration_seconds",
            "Time from a publish request's arrival to its answer, for accepted requests.",
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self._latency = Histogram(
            "herald_delivery_latency_seconds",
            "Time from an event's publish to the end of the flush that wrote it to this node's ready clients.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_OwnCounts(self))

    def attach(self, collector: Collector) -> None:
        """Read these figures at every scrape too (the hub's, the broker's)."""
        self.registry.register(collector)

    def connect(self, outcome: str) -> None:
        if outcome in self.connects:
            self.connects[outcome] += 1

    def published(self, events: int, seconds: float) -> None:
        self.events_published += events
        self._publish_duration.observe(seconds)

    def publish_failed(self, status: int) -> None:
        self.publish_errors["5xx" if status >= 500 else "4xx"] += 1

    def flushed(self, event_ids: Sequence[int], now: float) -> None:
        observe = self._latency.observe
        for event_id in event_ids:
            observe(max(0.0, now - event_id / 1_000_000))

    def figures(self) -> dict[str, float | int | None]:
        count, total, p99 = _histogram_figures(self._publish_duration)
        _, _, latency_p99 = _histogram_figures(self._latency)
        return {
            "connects": self.connects["accepted"] + self.connects["waited"],
            "events_published": self.events_published,
            "publish_errors": sum(self.publish_errors.values()),
            "publish_count": count,
            "publish_seconds_sum": total,
            "publish_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "latency_p99_ms": None if latency_p99 is None else round(latency_p99 * 1000, 3),
        }

    def expose(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _OwnCounts(Collector):
    """:class:`PrometheusMetrics`' integers, as Prometheus counters."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        yield labelled_counter(
            "herald_connects",
            "Subscription attempts (GET /events) by how they ended.",
            "outcome",
            m.connects.items(),
            known=CONNECT_OUTCOMES,
        )
        yield counter("herald_events_published", "Events accepted by this node's publish endpoint.", m.events_published)
        yield labelled_counter(
            "herald_publish_errors",
            "Publish requests refused (4xx) or failed (5xx).",
            "status",
            m.publish_errors.items(),
            known=PUBLISH_ERROR_CLASSES,
        )
        tally = m.tally
        yield counter("herald_deliveries", "Events written to clients (replays included).", tally.events)
        yield counter("herald_replayed_events", "Events written to clients as resume replays.", tally.replayed)
        yield counter("herald_bytes_sent", "Bytes of stream body written to clients.", tally.bytes)


def _histogram_figures(histogram: Histogram) -> tuple[int, float, float | None]:
    """Count, sum and the 99th percentile (upper bound of its bucket) of a histogram."""
    buckets: list[tuple[float, float]] = []
    count, total = 0.0, 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    if not count:
        return 0, total, None
    for bound, cumulative in sorted(buckets):
        if cumulative >= 0.99 * count:
            return int(count), total, bound if bound != float("inf") else None
    return int(count), total, None


class LatencyWindow:
    """Ids of the events that arrived since the last flush, for :meth:`Metrics.flushed` (bounded)."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids: list[int] = []

    def add(self, event_id: int) -> None:
        if len(self.ids) < _MAX_PENDING_LATENCIES:
            self.ids.append(event_id)

    def take(self) -> list[int]:
        ids, self.ids = self.ids, []
        return ids


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def labelled_counter(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]], known: Iterable[str] = ()
) -> CounterMetricFamily:
    """A counter by one label: every ``known`` value first, at 0 until counted (a series exists before its first
    event, so ``rate()`` and alerts see it), then any other value counted."""
    counts: dict[str, float] = dict.fromkeys(known, 0)
    counts.update(values)
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in counts.items():
        family.add_metric([key], value)
    return family
