"""``GET /metrics`` (Prometheus) and ``GET /cluster`` (the registry): what an operator reads.

:class:`NodeCollector` reads the hub's, the broker's and access control's
own counters when Prometheus scrapes, so none of them costs the hot path
anything (see :mod:`api.core.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.auth.access import Access
from api.core.hub import Hub
from api.core.metrics import RESET_REASONS, PrometheusMetrics, counter, gauge, labelled_counter
from api.deps import AdminOnly, HubDep, SettingsDep, require_admin
from api.errors import CLIENTS_GONE, RequestRejected
from api.node.registry import VERSION, NodeRegistry
from api.settings import Settings
from broker.base import Broker, ReportsStats

if TYPE_CHECKING:
    from api.adapter.guard import ConnectionGuard

router = APIRouter()


class NodeCollector(Collector):
    """The node's figures kept by its parts, read at scrape time."""

    def __init__(
        self, settings: Settings, hub: Hub, broker: Broker, access: Access, guard: ConnectionGuard | None = None
    ) -> None:
        self._guard = guard
        self._settings = settings
        self._hub = hub
        self._broker = broker
        self._access = access

    def collect(self) -> Iterable[Metric]:
        hub = self._hub
        info = GaugeMetricFamily("herald_node_info", "This node: its id and version.", labels=["node_id", "version"])
        info.add_metric([self._settings.node_id, VERSION], 1)
        yield info
        stats = hub.stats()
        yield gauge("herald_connections", "Open event streams.", stats["connections"])
        yield gauge("herald_topics", "Topics with at least one local client.", stats["topics"])
        yield gauge("herald_draining", "1 while the node drains (shutting down).", int(hub.draining))
        yield counter("herald_events_received", "Events received from the broker's feed.", stats["events_in"])
        yield counter("herald_slow_client_cutoffs", "Clients cut off for falling behind.", stats["cutoffs"])
        yield counter("herald_expired_streams", "Streams ended because their token expired.", stats["expired"])
        yield labelled_counter(
            "herald_resets",
            "Reset events sent to clients, by reason.",
            "reason",
            sorted(hub.resets.items()),
            known=RESET_REASONS,
        )
        broker = self._broker.stats() if isinstance(self._broker, ReportsStats) else {}
        yield gauge("herald_broker_up", "1 while the broker answers (and its feed is up).", _broker_up(hub, broker))
        yield counter(
            "herald_broker_feed_reconnects",
            "Times the broker feed had to connect again.",
            max(0, broker.get("feed_connects", 1) - 1),
        )
        yield counter(
            "herald_broker_backfilled_events",
            "Events read back from the replay buffer after a feed reconnect.",
            broker.get("backfilled_events", 0),
        )
        yield counter("herald_broker_replay_reads", "Replay buffer reads for resumes.", broker.get("history_reads", 0))
        yield gauge("herald_broker_pool_size", "Broker connections for commands.", broker.get("pool_size", 0))
        yield gauge("herald_broker_pool_in_use", "Broker connections in use now.", broker.get("pool_in_use", 0))
        yield counter(
            "herald_client_disconnects",
            "Requests whose client went away before their body was in (nothing was done).",
            CLIENTS_GONE.total,
        )
        guard = self._guard
        if guard is not None:
            yield labelled_counter(
                "herald_connections_shed",
                "Connections the node closed before their request was in, by reason (deadlines, caps).",
                "reason",
                guard.shed.items(),
            )
            yield gauge(
                "herald_connections_waiting", "Connections waiting for their request's head or body.", guard.waiting
            )
        if self._access.enabled:
            auth = self._access.stats()
            yield counter("herald_auth_tokens_verified", "Tokens verified (cache misses).", auth["tokens_verified"])
            yield counter("herald_auth_tokens_rejected", "Tokens refused.", auth["tokens_rejected"])


def _broker_up(hub: Hub, broker: dict[str, int]) -> int:
    return int(hub.broker_up and bool(broker.get("feed_up", 1)))


@router.get(
    "/metrics",
    summary="Prometheus metrics of this node",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."},
        401: {"description": "Access control is on and there is no usable token."},
        403: {"description": "The token has no admin rights."},
        404: {"description": "Metrics are off on this node (HERALD_METRICS=0)."},
        503: {"description": "Tokens can't be verified now (the JWKS is unreachable); retry later."},
    },
)
async def metrics(request: Request, hub: HubDep, settings: SettingsDep) -> Response:
    if not isinstance(hub.metrics, PrometheusMetrics):
        raise RequestRejected(404, "metrics are off on this node (HERALD_METRICS=0)")
    if not settings.metrics_public:
        await require_admin(request)
    body, content_type = hub.metrics.expose()
    return Response(body, media_type=content_type)


@router.get(
    "/cluster",
    summary="Every node of the cluster: live, draining, and gone within the last few minutes",
    dependencies=[AdminOnly],
    responses={
        401: {"description": "Access control is on and there is no usable token."},
        403: {"description": "The token has no admin rights."},
        503: {"description": "The broker (or the token keys) are unavailable; retry later."},
    },
)
async def cluster(request: Request) -> dict[str, Any]:
    registry: NodeRegistry = request.app.state.registry
    return {"nodes": await registry.cluster()}
