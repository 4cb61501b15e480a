"""``/.well-known/mercure``: the Mercure hub endpoint of every Herald node (publish, subscribe, discovery).

* ``POST /.well-known/mercure`` publishes an update (``application/x-www-form-urlencoded``:
  ``topic`` once or more, ``data``, ``private``, ``id``, ``type``, ``retry``;
  other fields ignored) as one event of the hub-wide sequence
  (:mod:`api.mercure.updates`) and answers ``200 text/plain`` with its id.
* ``GET /.well-known/mercure?match=...&match_urlpattern=...`` streams the
  updates whose topic (one of them) matches, private ones only when the token
  grants ``subscribe`` on one of their topics (:mod:`api.mercure.dispatch`),
  resuming after ``Last-Event-ID`` (or ``?last_event_id=``) and answering
  ``Mercure-Last-Event-ID``.
* ``GET /.well-known/oauth-protected-resource/.well-known/mercure``: the
  hub's protected resource metadata (RFC 9728), when it has a resource
  identifier.

Tokens: the hub validates Mercure access tokens (:mod:`api.mercure.authorization`)
with the node's key configuration (``HERALD_JWT_SECRET`` / ``_PUBLIC_KEY`` /
``HERALD_JWKS_URL``) and its own resource identifier
(``HERALD_MERCURE_AUDIENCE``) and trusted issuers (``HERALD_MERCURE_ISSUERS``).
Without a key or without a resource identifier no token can be valid: every
publish is refused (401: the spec lets a hub skip publisher authorization
only on a closed network, which a node can't know it is on), and subscribers
are anonymous ones (``HERALD_MERCURE_ANONYMOUS=1``) or none.

The routes answer their own errors (JSON ``detail``; ``WWW-Authenticate:
Bearer`` as the spec's "Error Responses" says) and their own CORS headers
(``HERALD_CORS_ORIGINS``, with credentials, never ``*``): the app's CORS
middleware covers the native routes only. They are left out of the OpenAPI
document (the Mercure spec is their reference). Subscribing is a plain ASGI
app (:func:`serve_subscribe`), reached by the node's ASGI shortcut.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import State
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api import adapter
from api.auth.access import Access
from api.auth.cors import Cors
from api.auth.keys import KeysUnavailable
from api.bodies import BodyTooLarge, read_body
from api.core.hub import Hub
from api.core.routing import Selection
from api.core.stream import connect_outcome
from api.errors import RETRY_AFTER_SECONDS
from api.mercure.authorization import (
    LEGACY_COOKIE_NAME,
    MERCURE_DETAIL_TYPES,
    BearerError,
    MercureGrant,
    MercureTokenVerifier,
    invalid_token,
    missing_token,
    token_from,
)
from api.mercure.matchers import DEFAULT_HUB_URL, MAX_MATCHERS, MatcherError, Matchers, check_publication_topic
from api.mercure.space import MercureSpace, space_of
from api.mercure.subscriptions import CONTEXT, ActiveSubscriptions, parse_api_path, select, subscriptions_of
from api.mercure.updates import (
    UPDATES_TOPIC,
    PublicationError,
    check_media_type,
    native_messages,
    parse_form,
    read_update,
)
from api.routes.events import node_id_header
from api.settings import Settings
from api.subscribe import Plan, keys_unavailable, open_subscription
from broker.base import Broker, BrokerUnavailable, Message

log = logging.getLogger("herald.mercure")

router = APIRouter()

HUB_PATH = "/.well-known/mercure"
METADATA_PATH = "/.well-known/oauth-protected-resource" + HUB_PATH
SUBSCRIPTIONS_PATH = HUB_PATH + "/subscriptions"
MAX_QUERY_FIELDS = MAX_MATCHERS + 20
"""Query parameters of a subscribe request (matchers, and a few others: last_event_id, access_token)."""

EXPOSE_HEADERS = b"X-Node-Id, Mercure-Last-Event-ID, Link, WWW-Authenticate, Retry-After"
"""Response headers a page of an allowed origin may read (fetch-based subscribers need the first three)."""
ALLOW_HEADERS = b"Authorization, Content-Type, Last-Event-ID, Cache-Control"
"""Request headers a preflight allows (``Cache-Control: no-store`` is what the spec asks of query-token clients)."""
ALLOW_METHODS = b"GET, POST, OPTIONS"


@dataclass
class HubConfig:
    """What the hub endpoint needs of the node's configuration, worked out once per app."""

    hub_url: str
    """The hub's URL: the base of relative topics and patterns, and of the reserved namespace."""
    audience: str | None
    """The resource identifier (the ``aud`` tokens must carry); None: no token can be valid."""
    issuers: tuple[str, ...]
    verifier: MercureTokenVerifier | None
    anonymous: bool
    cookies: tuple[str, ...]
    resource_metadata: str | None
    """The URL of the metadata document, for challenges (when the resource identifier is a URL)."""
    subscriptions: bool = False
    """Active subscriptions are on (``HERALD_MERCURE_SUBSCRIPTIONS``)."""
    warned: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, access: Access) -> HubConfig:
        audience = settings.mercure_audience or None
        hub_url, metadata_url = DEFAULT_HUB_URL, None
        if audience is not None:
            parts = urlsplit(audience)
            if parts.scheme in ("http", "https") and parts.netloc:
                origin = f"{parts.scheme}://{parts.netloc}"
                hub_url, metadata_url = origin + HUB_PATH, origin + METADATA_PATH
        issuers = tuple(i.strip() for i in settings.mercure_issuers.split(",") if i.strip())
        verifier = None
        if access.verifier is not None and audience is not None:
            verifier = MercureTokenVerifier(
                access.verifier.keys,
                audience=audience,
                issuers=issuers,
                leeway=settings.jwt_leeway,
                base_url=hub_url,
                resource_metadata=metadata_url,
            )
        cookies = tuple(dict.fromkeys((settings.mercure_cookie, LEGACY_COOKIE_NAME)))
        return cls(
            hub_url,
            audience,
            issuers,
            verifier,
            settings.mercure_anonymous,
            cookies,
            metadata_url,
            settings.mercure_subscriptions,
        )

    def missing_token(self) -> BearerError:
        return missing_token(resource_metadata=self.resource_metadata)

    async def authenticate(
        self, headers: list[tuple[bytes, bytes]], query: list[tuple[str, str]], *, cookies: bool
    ) -> MercureGrant | None:
        """The grant of the request's token (header, then ``access_token``, then cookie); None without one.

        Raises BearerError (400/401), KeysUnavailable.
        """
        names = self.cookies if cookies else ()
        if self.verifier is not None:
            return await self.verifier.authenticate(headers, names, query=query)
        try:
            token = token_from(headers, names, query=query)
        except BearerError as exc:
            raise exc.with_parameters(resource_metadata=self.resource_metadata) from None
        if token is None:
            return None
        if not self.warned:
            self.warned = True
            log.warning(
                "a Mercure token was refused: the hub validates none without %s",
                "HERALD_MERCURE_AUDIENCE" if self.audience is None else "a key (HERALD_JWT_SECRET, ...)",
            )
        raise invalid_token("the hub has no key or resource identifier", resource_metadata=self.resource_metadata)

    def metadata(self) -> dict[str, Any] | None:
        """The protected resource metadata document (RFC 9728); None without a resource identifier."""
        if self.audience is None:
            return None
        document: dict[str, Any] = {
            "resource": self.audience,
            "bearer_methods_supported": ["header", "query"],
            "authorization_details_types_supported": sorted(MERCURE_DETAIL_TYPES),
            "mercure_cookie": True,
        }
        if self.issuers:
            document["authorization_servers"] = list(self.issuers)
        if self.subscriptions:
            document["mercure_subscriptions"] = True
        return document


def _parts(state: State) -> tuple[MercureSpace, HubConfig]:
    """The hub's Mercure space and the app's Mercure configuration, made on first use (after the lifespan)."""
    mercure = space_of(state.hub, state.broker)
    config: HubConfig | None = getattr(state, "mercure_config", None)
    if config is None:
        config = state.mercure_config = HubConfig.from_settings(state.settings, state.access)
    return mercure, config


def _tracker(state: State) -> ActiveSubscriptions | None:
    """The node's active subscriptions (``HERALD_MERCURE_SUBSCRIPTIONS=1`` on a broker that can list them)."""
    tracker: ActiveSubscriptions | None = getattr(state, "mercure_subscriptions", None)
    return tracker if tracker is not None and tracker.available else None


# -- answers -------------------------------------------------------------------------------------------


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _refused(exc: BearerError) -> Response:
    """401/403/400 with the exact challenge; the body never says why a token was invalid."""
    detail = exc.description or ("an access token is required" if exc.status == 401 else str(exc))
    return _error(exc.status, detail, exc.headers)


def _unavailable(why: str) -> Response:
    return _error(503, why, {"Retry-After": str(RETRY_AFTER_SECONDS)})


_ANSWERED = (PublicationError, MatcherError, BearerError, KeysUnavailable, BrokerUnavailable)
"""What the hub's endpoints raise for a client's mistake or a passing cause: answered, never a 500."""


def _answer_for(exc: Exception) -> Response:
    """The answer to one of :data:`_ANSWERED`: the client's fault 4xx, a passing cause 503 + Retry-After."""
    if isinstance(exc, PublicationError):
        return _error(exc.status, exc.detail)
    if isinstance(exc, BearerError):
        return _refused(exc)
    if isinstance(exc, MatcherError):
        return _error(exc.status, str(exc))
    if isinstance(exc, KeysUnavailable):
        return _unavailable(f"tokens can't be verified now: {exc}")
    return _unavailable(f"broker unavailable: {exc}")


def _with_cors(response: Response, cors: Cors, headers: list[tuple[bytes, bytes]]) -> Response:
    for name, value in cors.headers(headers):
        response.raw_headers.append((name, EXPOSE_HEADERS if name == b"access-control-expose-headers" else value))
    return response


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


def _query(scope: Scope) -> list[tuple[str, str]]:
    """The query's name/value pairs (``application/x-www-form-urlencoded``); ValueError when not UTF-8 or too long."""
    raw: bytes = scope.get("query_string", b"")
    return parse_qsl(
        raw.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=MAX_QUERY_FIELDS
    )


def _cookie_may_publish(headers: list[tuple[bytes, bytes]], cors: Cors) -> bool:
    """A cookie may authorize a publish only from a page of this origin or an allowed one (CSRF).

    The request must say where it comes from (``Origin``, else ``Referer``):
    without either, the cookie is not used.
    """
    origin = _header(headers, b"origin")
    if origin is None:
        referer = _header(headers, b"referer")
        if referer is None:
            return False
        parts = urlsplit(referer.decode("latin-1"))
        if not parts.scheme or not parts.netloc:
            return False
        origin = f"{parts.scheme}://{parts.netloc}".encode("latin-1")
    host = _header(headers, b"host")
    claimed = [(b"origin", origin), *([(b"host", host)] if host is not None else [])]
    return cors.trusts_ambient_credentials(claimed)


# -- publish -------------------------------------------------------------------------------------------


@router.post(HUB_PATH, include_in_schema=False)
async def publish(request: Request) -> Response:
    """Publish a Mercure update; ``200 text/plain`` with its id."""
    state = request.app.state
    _, config = _parts(state)
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    started = time.perf_counter()
    try:
        response = await _publish(request, state.broker, state.settings, state.cors, config)
    except _ANSWERED as exc:
        response = _answer_for(exc)
    metrics = state.hub.metrics  # one update is one event published (its native copies are the same event)
    if response.status_code == 200:
        metrics.published(1, time.perf_counter() - started)
    else:
        metrics.publish_failed(response.status_code)
    return _with_cors(response, state.cors, headers)


async def _publish(request: Request, broker: Broker, settings: Settings, cors: Cors, config: HubConfig) -> Response:
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    try:
        query = _query(request.scope)
    except ValueError:
        raise PublicationError(400, "the query string is not UTF-8 form data") from None
    # The publisher's token first: an anonymous client can't make the node read a body.
    grant = await config.authenticate(headers, query, cookies=_cookie_may_publish(headers, cors))
    if grant is None or config.verifier is None:
        raise config.missing_token()
    check_media_type(request.headers.get("content-type"))
    update = read_update(parse_form(await _read_body(request, settings.max_body_bytes)), settings.max_event_bytes)
    for topic in update.topics:
        check_publication_topic(topic, hub_url=config.hub_url)
    for topic in update.topics:  # the canonical topic and every alternate
        config.verifier.require_publish(grant, topic)
    messages = [Message(UPDATES_TOPIC, update.encode())]
    if settings.mercure_native:
        messages += native_messages(update)  # the same atomic publish: all of them, or none
    events = await broker.publish(messages)
    return Response(update.sse_id(events[0].id), media_type="text/plain")


async def _read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_body(request, limit)
    except BodyTooLarge as exc:
        raise PublicationError(413, f"the request body is over the limit of {exc.limit} bytes") from None


# -- subscribe -----------------------------------------------------------------------------------------


async def serve_subscribe(state: State, scope: Scope, receive: Receive, send: Send, *, node_id: bool = False) -> None:
    """``GET /.well-known/mercure`` as plain ASGI: no ``Request``, no dependency solving.

    A stream lives for hours, and what the request path leaves on the stack
    stays for as long: :class:`api.app.HeraldApp`'s ASGI shortcut calls this
    directly, as it answers ``/events`` (:func:`api.routes.events.events_response`), with ``node_id``
    (the ``X-Node-Id`` header the middleware would have added). The route
    below (a plain ASGI app, no FastAPI request handling) serves the rest: an
    app mounted under a ``root_path``.
    """
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    mercure, config = _parts(state)
    tracker = _tracker(state)
    response = await _subscribe(state.hub, mercure, config, state.settings, state.cors, scope, receive, tracker)
    if connect_outcome(response) is None:  # a refusal (api.subscribe counts every stream and "come back")
        state.hub.metrics.connect(_connect_outcome(response))
    if node_id:
        response.raw_headers.append(node_id_header(state.settings.node_id))
    await _with_cors(response, state.cors, headers)(scope, receive, send)


def _connect_outcome(response: Response) -> str:
    """How a subscribe ended its connect (:func:`api.core.stream.connect_outcome`; refusals by their status)."""
    outcome = connect_outcome(response)
    if outcome is not None:
        return outcome
    return {401: "unauthorized", 403: "forbidden"}.get(response.status_code, "bad_request")


class _SubscribeEndpoint:
    """The route's ASGI app (a Starlette route to an ASGI app skips FastAPI's request handling)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":  # HEAD: a stream has no end to send the headers of
            await Response(status_code=405, headers={"Allow": "GET, POST, OPTIONS"})(scope, receive, send)
            return
        await serve_subscribe(scope["app"].state, scope, receive, send)


router.routes.append(
    Route(HUB_PATH, _SubscribeEndpoint(), methods=["GET"], name="mercure_subscribe", include_in_schema=False)
)


async def _subscribe(
    hub: Hub,
    mercure: MercureSpace,
    config: HubConfig,
    settings: Settings,
    cors: Cors,
    scope: Scope,
    receive: Receive,
    tracker: ActiveSubscriptions | None,
) -> Response:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    try:
        query = _query(scope)
    except ValueError:
        return _error(400, f"the query must be UTF-8 form data with at most {MAX_QUERY_FIELDS} parameters")
    try:
        matchers = Matchers.from_query(query, base_url=config.hub_url)
    except MatcherError as exc:
        return _error(exc.status, str(exc))
    if not len(matchers):
        return _error(400, "give at least one topic matcher: ?match=<topic> or ?match_urlpattern=<pattern>")
    try:
        grant = await config.authenticate(headers, query, cookies=cors.trusts_ambient_credentials(headers))
    except BearerError as exc:
        return _refused(exc)
    except KeysUnavailable as exc:
        return keys_unavailable(hub, settings.retry_ms, exc)
    if grant is None and not config.anonymous:
        return _refused(config.missing_token())
    cursor = _cursor(headers, query)
    plan = Plan(
        selection=Selection(
            mercure.feed,
            exact=None if matchers.has_patterns else matchers.exact_topics,
            matcher=matchers,
            everything=matchers.wildcard,
            reader=grant.subscribe if grant is not None else None,
        ),
        cursor=cursor,
        expires_at=grant.expires_at if grant is not None else 0.0,
        # The answer to a resume must say where it starts (Mercure-Last-Event-ID): it can't wait for the broker.
        may_wait=cursor is None,
        cursor_header=b"mercure-last-event-id",
    )
    if tracker is not None:
        subscriptions = subscriptions_of(matchers, grant)
        plan.hooks = (
            functools.partial(tracker.started, subscriptions),
            functools.partial(tracker.ended, subscriptions),
        )
    response = await open_subscription(
        hub,
        plan,
        retry_ms=settings.retry_ms,
        heartbeat=settings.heartbeat,
        on_overflow=adapter.active.aborter(receive),
    )
    if any(name == "access_token" for name, _ in query):
        # "URI Query Parameter": a success answer to a request carrying its token in the URL is private.
        private = [(n, b"private, no-cache" if n == b"cache-control" else v) for n, v in response.raw_headers]
        response.raw_headers = private
    return response


def _cursor(headers: list[tuple[bytes, bytes]], query: list[tuple[str, str]]) -> str | None:
    """``Last-Event-ID`` (UTF-8, as EventSource sends it), else ``?last_event_id=``; None when neither is there."""
    value = _header(headers, b"last-event-id")
    if value is not None:
        return value.decode("utf-8", "replace")
    return next((v for name, v in query if name == "last_event_id"), None)


# -- the subscription API ------------------------------------------------------------------------------


@router.get(SUBSCRIPTIONS_PATH, include_in_schema=False)
@router.get(SUBSCRIPTIONS_PATH + "/{rest:path}", include_in_schema=False)
async def subscriptions_api(request: Request) -> Response:
    """ "Subscription API": the cluster's active subscriptions, all, of one matcher, or one; ``application/ld+json``."""
    state = request.app.state
    _, config = _parts(state)
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    try:
        response = await _subscriptions(request, config, _tracker(state), state.cors)
    except _ANSWERED as exc:
        response = _answer_for(exc)
    return _with_cors(response, state.cors, headers)


async def _subscriptions(
    request: Request, config: HubConfig, tracker: ActiveSubscriptions | None, cors: Cors
) -> Response:
    if tracker is None:
        return _error(404, "active subscriptions are off on this hub (HERALD_MERCURE_SUBSCRIPTIONS=1 turns them on)")
    # The resource, as requested: each variable stays one (percent-encoded) segment.
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    try:
        path = raw.decode("ascii")
        selection = parse_api_path(path, HUB_PATH)
    except (UnicodeDecodeError, ValueError):
        selection = None
    if selection is None:
        return _error(404, "no such resource of the subscription API")
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    try:
        query = _query(request.scope)
    except ValueError:
        return _error(400, "the query must be UTF-8 form data")
    grant = await config.authenticate(headers, query, cookies=cors.trusts_ambient_credentials(headers))
    if config.verifier is None:
        raise config.missing_token()
    config.verifier.require_subscribe(grant, path)  # the relative URL is the topic to authorize
    last_event_id, active = await tracker.listing()
    chosen = select(selection, active)
    document: dict[str, Any]
    if selection[0] == "one":
        if not chosen:
            return _error(404, "no active subscription here")
        document = {"@context": CONTEXT, **chosen[0].document(HUB_PATH, active=True)}
    else:
        document = {
            "@context": CONTEXT,
            "id": path,
            "type": "Subscriptions",
            "subscriptions": [s.document(HUB_PATH, active=True) for s in chosen],
        }
    document["last_event_id"] = last_event_id
    hub_url = str(request.base_url).rstrip("/") + HUB_PATH
    return JSONResponse(
        document,
        media_type="application/ld+json",
        headers={"Link": f'<{hub_url}>; rel="mercure"', "Cache-Control": "private, must-revalidate"},
    )


# -- preflight and discovery ---------------------------------------------------------------------------


@router.options(HUB_PATH, include_in_schema=False)
async def preflight(request: Request) -> Response:
    """CORS preflight for pages of the allowed origins (``HERALD_CORS_ORIGINS``)."""
    cors: Cors = request.app.state.cors
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    if not cors or _header(headers, b"access-control-request-method") is None:
        return Response(status_code=204, headers={"Allow": ALLOW_METHODS.decode()})
    status, extra = cors.preflight(headers)
    response = Response(status_code=status)
    for name, value in extra:
        if name == b"access-control-allow-headers":
            value = ALLOW_HEADERS
        elif name == b"access-control-allow-methods":
            value = ALLOW_METHODS
        response.raw_headers.append((name, value))
    return response


@router.get(METADATA_PATH, include_in_schema=False)
async def resource_metadata(request: Request) -> Response:
    """The hub's OAuth 2.0 protected resource metadata (RFC 9728); 404 without a resource identifier."""
    state = request.app.state
    _, config = _parts(state)
    document = config.metadata()
    if document is None:
        response = _error(404, "the hub has no resource identifier (HERALD_MERCURE_AUDIENCE)")
    else:
        response = JSONResponse(document)
    return _with_cors(response, state.cors, request.scope["headers"])
