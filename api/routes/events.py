"""``GET /events``: subscribe to topics over Server-Sent Events, resuming where the client left.

Two entrances, one decision (:mod:`api.subscribe`, through :func:`open_stream`):

* :func:`events_response`, plain ASGI whose answer :class:`api.app.HeraldApp`
  sends for ``GET /events`` before FastAPI's routing. A stream lives for
  hours and every frame of the request path stays in memory for as long:
  FastAPI's routing, middleware and dependency solving held several KB per
  idle connection and most of the CPU of a connect (``make bench``: idle
  memory, 5,000 connects at once). Here a connect is a query-string parse
  and the hub's work.
* the FastAPI route below: the same stream for an app mounted where the
  ASGI shortcut does not match (under a ``root_path``), and the route the
  OpenAPI document describes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.types import Receive, Scope

from api import adapter, errors
from api.auth.access import Access, Denied
from api.auth.cors import Cors
from api.auth.credentials import subscriber_token
from api.auth.keys import KeysUnavailable
from api.core.hub import Hub
from api.deps import AccessDep, HubDep, SettingsDep
from api.errors import RequestRejected
from api.settings import Settings
from api.subscribe import count_refusal, keys_unavailable, native_plan, open_subscription

router = APIRouter()


async def open_stream(
    hub: Hub,
    settings: Settings,
    access: Access,
    topics: list[str],
    resume: str | None,
    token: str | None,
    on_overflow: Callable[[], None] | None,
) -> Response:
    """The answer to a native subscribe (:mod:`api.subscribe` decides it), its outcome counted."""
    try:
        plan = await native_plan(access, topics, settings.max_topics, resume, token)
    except (RequestRejected, Denied) as exc:
        count_refusal(hub, exc)
        raise
    except KeysUnavailable as exc:
        return keys_unavailable(hub, settings.retry_ms, exc)
    return await open_subscription(
        hub, plan, retry_ms=settings.retry_ms, heartbeat=settings.heartbeat, on_overflow=on_overflow
    )


def parse_query(query: str) -> list[tuple[str, str]]:
    """``parse_qsl(query, keep_blank_values=True)``, without its per-field unquoting when nothing is quoted.

    A subscribe's query is most often ``topic=a&topic=b``: no ``%`` and no
    ``+``, so the fields are the pieces between ``&`` split at the first ``=``
    (a piece without one is a name with an empty value; empty pieces are
    skipped), exactly as parse_qsl would give them, at a fifth of the cost.
    """
    if "%" in query or "+" in query:
        return parse_qsl(query, keep_blank_values=True)
    return [(name, value) for name, _, value in (piece.partition("=") for piece in query.split("&") if piece)]


@functools.lru_cache(maxsize=16)
def node_id_header(node_id: str) -> tuple[bytes, bytes]:
    """The ``X-Node-Id`` response header, encoded once per node id (not once per connect)."""
    return (b"x-node-id", node_id.encode("ascii"))


async def events_response(
    hub: Hub, settings: Settings, access: Access, cors: Cors, scope: Scope, receive: Receive
) -> Response:
    """The answer to ``GET /events`` as the route gives it (stream or error, CORS, ``X-Node-Id``), not yet sent.

    It returns rather than sends: :class:`api.app.HeraldApp` awaits the
    response itself, so this frame (its query, topics, token) is gone while
    the stream lives (``make bench``: idle memory).
    """
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    query = parse_query(scope.get("query_string", b"").decode("latin-1"))
    topics = [value for name, value in query if name == "topic"]
    resume = next((v.decode("latin-1") for k, v in headers if k == b"last-event-id"), None)
    if resume is None:
        resume = next((value for name, value in query if name == "last_event_id"), None)
    token = (
        subscriber_token(headers, query, settings.jwt_cookie, cors.trusts_ambient_credentials(headers))
        if access.enabled
        else None
    )
    response: Response
    try:
        response = await open_stream(hub, settings, access, topics, resume, token, adapter.active.aborter(receive))
    except RequestRejected as exc:  # the app's own error answers, as the FastAPI route gives them
        response = await errors.request_rejected(Request(scope, receive), exc)
    except Denied as exc:
        response = errors.denied_response(exc)
    response.raw_headers.append(node_id_header(settings.node_id))
    if cors:
        response.raw_headers.extend(cors.headers(headers))
    return response


@router.get(
    "/events",
    response_class=Response,
    summary="Subscribe to topics (Server-Sent Events)",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        400: {"description": "No topic, an invalid topic name or too many topics."},
        401: {"description": "Access control is on and the topics need a token: none, or an unusable one."},
        403: {"description": "The token does not allow subscribing to one of the topics (named in the body)."},
    },
)
async def events(
    request: Request,
    hub: HubDep,
    settings: SettingsDep,
    access: AccessDep,
    topic: Annotated[list[str] | None, Query(description="Topic to subscribe to; repeat for more.")] = None,
    last_event_id: Annotated[
        str | None, Query(description="Resume after this id, when the Last-Event-ID header can't be set.")
    ] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    access_token: Annotated[
        str | None,
        Query(
            description="The subscriber's token, for a cross-origin EventSource that can't send headers"
            " (Authorization: Bearer and the cookie are the other places; use short-lived tokens here)."
        ),
    ] = None,
) -> Response:
    """Stream the topics' events; with ``Last-Event-ID``, first everything missed since that id.

    The stream starts with ``retry:``; each event has ``id:``, ``event:`` when
    it has a type, and ``data:`` lines. A ``reset`` event says the resume
    could not be exact. Comment lines keep an idle stream alive.
    """
    topics = request.query_params.getlist("topic")
    resume = last_event_id_header if last_event_id_header is not None else last_event_id
    headers = request.scope["headers"]
    cors: Cors = request.app.state.cors
    token = (
        subscriber_token(
            headers, request.query_params.multi_items(), settings.jwt_cookie, cors.trusts_ambient_credentials(headers)
        )
        if access.enabled
        else None
    )
    return await open_stream(hub, settings, access, topics, resume, token, adapter.active.aborter(request.receive))
