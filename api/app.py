"""The FastAPI application factory. Nothing is built at import time.

The broker and the hub are created in the lifespan, so each app instance
(each test server, each node) owns its own, and they are closed with it.
Run with ``python -m api`` (see :mod:`api.__main__`), or
``uvicorn --factory api.app:create_app``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from api import adapter, errors
from api.adapter import DIRECT_WRITES
from api.auth.access import Access, Denied
from api.auth.cors import Cors, CorsMiddleware
from api.auth.keys import KeysUnavailable
from api.bodies import ClientGone
from api.core.hub import Hub
from api.core.metrics import Metrics, NullMetrics, PrometheusMetrics
from api.mercure.routes import HUB_PATH as MERCURE_HUB_PATH
from api.mercure.routes import router as mercure_router
from api.mercure.routes import serve_subscribe
from api.mercure.subscriptions import ActiveSubscriptions
from api.middleware import NodeIdMiddleware
from api.models import TOPIC_PATTERN, PublishEvent
from api.node.registry import NodeRegistry
from api.node.stall import StallWatch
from api.routes.dashboard import router as dashboard_router
from api.routes.docs import router as docs_router
from api.routes.events import events_response
from api.routes.events import router as events_router
from api.routes.health import probe_response
from api.routes.health import router as health_router
from api.routes.monitoring import NodeCollector
from api.routes.monitoring import router as monitoring_router
from api.routes.publish import router as publish_router
from api.settings import Settings
from broker.base import Broker, BrokerUnavailable, IdempotencyConflict, RetentionPolicy
from broker.factory import create_broker

if TYPE_CHECKING:
    from api.adapter.guard import ConnectionGuard
    from api.adapter.lane import StreamLane

BrokerFactory = Callable[[Settings], Broker]

log = logging.getLogger("herald.node")


def _default_broker(settings: Settings) -> Broker:
    return create_broker(
        settings.redis_url,
        RetentionPolicy(settings.replay_size, settings.replay_ttl, settings.replay_ceiling()),
        sentinels=settings.redis_sentinels,
        sentinel_master=settings.redis_sentinel_master,
        cluster_nodes=settings.redis_cluster_nodes,
        pool=settings.redis_pool,
        replicas_ack=settings.redis_replicas_ack,
        partitions=settings.redis_partitions,
        read_replicas=settings.redis_read_replicas,
    )


def create_app(settings: Settings | None = None, broker_factory: BrokerFactory = _default_broker) -> FastAPI:
    """A Herald node. ``settings`` default to the environment."""
    settings = settings or Settings()
    server = adapter.install(settings.uvicorn_adapter)  # what serves beyond ASGI: the adapter, or stock uvicorn
    access = Access.from_settings(settings)  # refuses an unusable key configuration now, before serving
    cors = Cors.parse(settings.cors_origins)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = broker_factory(settings)
        node_metrics: Metrics = PrometheusMetrics() if settings.metrics else NullMetrics()
        hub = Hub(
            broker,
            client_buffer=settings.client_buffer,
            heartbeat=settings.heartbeat,
            max_connections=settings.max_connections,
            metrics=node_metrics,
        )
        guard = adapter.active.connection_guard(settings)  # deadlines and caps before a request is in (api.adapter)
        if isinstance(node_metrics, PrometheusMetrics):
            node_metrics.attach(NodeCollector(settings, hub, broker, access, guard))
        watch = StallWatch(broker)
        registry = NodeRegistry(settings, broker, hub, watch)
        subscriptions = (
            ActiveSubscriptions(broker, settings.node_id, MERCURE_HUB_PATH) if settings.mercure_subscriptions else None
        )
        await access.start()
        await broker.start(hub)
        await hub.start()
        registry.start()
        watch.start()
        if subscriptions is not None:
            subscriptions.start()
        app.state.broker = broker
        app.state.hub = hub
        if isinstance(app, HeraldApp):
            app.serving = (hub, settings, access, cors)
            app.connection_guard = guard
            # Herald's protocol answers the streams it can itself (api.adapter.lane); stock uvicorn: None.
            app.stream_lane = adapter.active.stream_lane(hub, settings, access, cors)
        app.state.registry = registry
        app.state.stall_watch = watch
        if isinstance(app, HeraldApp):
            app.stall_watch = watch
        app.state.mercure_subscriptions = subscriptions
        log.info("node %s serving on %s (broker: %s)", settings.node_id, registry.url, type(broker).__name__)
        try:
            yield
        finally:
            if isinstance(app, HeraldApp):
                app.stream_lane = None
                app.serving = None
                app.connection_guard = None
                app.stall_watch = None
            await watch.close()
            if guard is not None:
                guard.close()
            await registry.close()
            await hub.close()
            if subscriptions is not None:
                await subscriptions.close()  # the ended streams' "active: false" events, before the broker goes
            await broker.close()
            await access.close()

    app = HeraldApp(
        title="Herald",
        summary="Real-time push over Server-Sent Events",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by api.routes.docs from the package: no CDN
        # A path that names nothing is a 404, never a redirect to a guess: Starlette's guess, a route's "$"
        # matching before a final newline, sent ".../subscriptions/%0A/" to ".../subscriptions/%0A" (307).
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.server = server
    app.state.access = access
    app.state.cors = cors
    app.add_middleware(CorsMiddleware, cors=cors)
    app.add_middleware(NodeIdMiddleware, node_id=settings.node_id)
    app.add_exception_handler(errors.RequestRejected, errors.request_rejected)
    app.add_exception_handler(Denied, errors.denied)
    app.add_exception_handler(KeysUnavailable, errors.keys_unavailable)
    app.add_exception_handler(BrokerUnavailable, errors.broker_unavailable)
    app.add_exception_handler(IdempotencyConflict, errors.idempotency_conflict)
    app.add_exception_handler(ClientGone, errors.client_gone)
    app.include_router(publish_router)
    app.include_router(events_router)
    app.include_router(health_router)
    app.include_router(monitoring_router)
    app.include_router(docs_router)
    app.include_router(dashboard_router)
    app.include_router(mercure_router)  # /.well-known/mercure (its GET takes the ASGI shortcut: HeraldApp)
    _document_publish_body(app, settings)
    return app


class HeraldApp(FastAPI):
    """The FastAPI app, noting per request whether streams may write to the socket directly.

    It also sends ``GET /events`` straight to :func:`api.routes.events.events_response`
    and ``GET /.well-known/mercure`` to :func:`api.mercure.routes.serve_subscribe`
    (the ASGI shortcut), ahead of FastAPI's middleware and routing.

    The fast path of :mod:`api.core.connection` writes event bytes to the
    server's transport without going through ``send``. That is only right
    when every layer between the server and the stream leaves the body
    alone. Inside this app that holds (its middleware only add headers); an
    ASGI wrapper *around* the app might transform the body, and then its
    ``send`` is not the server's own, which is what is checked here.
    """

    stream_lane: StreamLane | None = None
    """Set while the node serves: Herald's protocol answers the streams it can itself (api.adapter.lane)."""

    connection_guard: ConnectionGuard | None = None
    """Set while the node serves: deadlines and caps for requests not in yet (api.adapter.guard)."""

    stall_watch: StallWatch | None = None
    """Set while the node serves: whether it is resynchronising after standing still (``GET /probe``)."""

    serving: tuple[Hub, Settings, Access, Cors] | None = None
    """Set while the node serves: what ``GET /events`` needs, at hand (the app's state is a ``__getattr__`` each)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[DIRECT_WRITES] = adapter.active.direct_writes(receive, send)
            # The ASGI shortcut (see api.routes.events): streams skip FastAPI's request path.
            if scope["method"] == "GET" and not scope.get("root_path"):
                path = scope["path"]
                if path == "/events":
                    serving = self.serving
                    if serving is not None:
                        # Awaited here, not in a helper: one coroutine fewer under every stream (api.routes.events).
                        hub, settings, access, cors = serving
                        response = await events_response(hub, settings, access, cors, scope, receive)
                        await response(scope, receive, send)
                        return
                if path == "/probe":  # the front's, before every stream: as cheap as an answer gets
                    serving, watch = self.serving, self.stall_watch
                    if serving is not None and watch is not None:
                        await probe_response(serving[0], watch, serving[1].node_id)(scope, receive, send)
                        return
                if path == MERCURE_HUB_PATH:  # the Mercure hub's streams too (it answers its own CORS)
                    await serve_subscribe(self.state, scope, receive, send, node_id=True)
                    return
        await super().__call__(scope, receive, send)


ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"description": "What is wrong, for a person to read."}},
    "required": ["detail"],
}


ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _document_publish_body(app: FastAPI, settings: Settings) -> None:
    """Complete the OpenAPI document where the routes parse their input themselves.

    The publish route reads its body itself, and the ``/events`` route
    checks its topics itself (with a 400, where FastAPI would say 422), so
    their schemas are written here: the PublishEvent schema (its ``$defs``
    hoisted into the components, or their references would dangle), the
    topic list's constraints, and the JSON error body of every refusal.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            publish_event = PublishEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(publish_event.pop("$defs", {}))
            components["PublishEvent"] = publish_event
            components["Error"] = ERROR_SCHEMA
            for item in schema["paths"].values():
                for operation in item.values():
                    for status, response in operation.get("responses", {}).items():
                        if status[0] in "45" and "content" not in response:
                            response["content"] = {"application/json": {"schema": ERROR_REF}}
            events = schema["paths"]["/events"]["get"]
            events["responses"].pop("422", None)
            for parameter in events.get("parameters", []):
                if parameter["name"] == "topic" and parameter["in"] == "query":
                    parameter["required"] = True
                    parameter["schema"] = {
                        "type": "array",
                        "items": {"type": "string", "pattern": TOPIC_PATTERN},
                        "minItems": 1,
                        "maxItems": settings.max_topics,
                    }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
