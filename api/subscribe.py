"""Where a subscribe is decided: a request's subscription in, a stream, a "come back" or a refusal out.

Every entrance is a thin caller of this module: the native route and its
ASGI shortcut (:mod:`api.routes.events`), the protocol's stream lane
(:mod:`api.adapter.lane`, which may only take what needs no awaiting) and
the Mercure endpoint (:mod:`api.mercure.routes`). Each reads its own
request's form into a :class:`Plan` (the native API: :func:`native_plan`;
Mercure: its matchers and token); from there the decision is one:

* the node's admission (:meth:`api.core.hub.Hub.admit`): draining or full is
  a passing cause, answered ``200 text/event-stream`` with a ``retry:``, the
  only answer a browser's EventSource retries;
* the grant's expiry: the stream ends when its token does;
* the opening (:meth:`api.core.hub.Hub.open`): the resume, or the
  broker being unavailable, when the stream waits for it (a plan that may
  not wait is told to come back);
* the answer: :class:`~api.core.stream.EventStreamResponse`, its status and
  headers (the space's own, such as Mercure's ``Mercure-Last-Event-ID``),
  and the connect counted once (``herald_connects_total``).

Only the client's own mistakes raise (RequestRejected, Denied: 4xx).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import Response

from api.auth.access import Access, Denied
from api.auth.keys import KeysUnavailable
from api.core.connection import Connection
from api.core.hub import Hub, Opened, Refused
from api.core.routing import Selection
from api.core.stream import EventStreamResponse, RetryLaterResponse, connect_outcome
from api.errors import RequestRejected
from api.models import is_topic
from broker.base import BrokerUnavailable


@dataclass(slots=True)
class Plan:
    """A subscription, decided: what it selects, where it resumes, until when, and how it is answered."""

    topics: tuple[str, ...] = ()
    """The native topics (none for a subscription of another space: ``selection``)."""
    selection: Selection | None = None
    cursor: str | None = None
    """Where it resumes (``Last-Event-ID``); None: now."""
    expires_at: float = 0.0
    """When its grant ends, in seconds since the epoch (0: never)."""
    may_wait: bool = True
    """Whether the stream may start before the broker answers and wait for it (else: come back)."""
    cursor_header: bytes | None = None
    """The header a "come back" to a resume names its cursor in (Mercure's ``Mercure-Last-Event-ID``)."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """Response headers every answer to it carries."""
    hooks: tuple[Callable[[], None], Callable[[], None]] | None = None
    """Called when the stream starts and when it ends (Mercure's active subscriptions)."""


def check_topics(topics: list[str], max_topics: int) -> tuple[str, ...]:
    """The topics of a native subscription, checked; RequestRejected (400) when there is no valid list."""
    if not topics:
        raise RequestRejected(400, "give at least one topic: /events?topic=NAME")
    if len(topics) > max_topics:
        raise RequestRejected(400, f"at most {max_topics} topics per connection, got {len(topics)}")
    bad = [t for t in topics if not is_topic(t)]
    if bad:
        raise RequestRejected(400, f"invalid topic name {bad[0][:210]!r}: use 1-200 letters, digits and _ - . : / @")
    # A topic named twice is one subscription, kept in the order first given.
    return tuple(dict.fromkeys(topics))


async def native_plan(
    access: Access, topics: list[str], max_topics: int, resume: str | None, token: str | None
) -> Plan:
    """The plan of a native subscription.

    Raises RequestRejected (bad topics), Denied (the token) and KeysUnavailable
    (the verifier can't check tokens now: :func:`keys_unavailable` answers it).
    """
    checked = check_topics(topics, max_topics)
    if resume is not None and not resume.strip():
        resume = None  # an empty id means "no id yet", as EventSource sends it
    # Without access control there is nothing to await (a coroutine per connect saved).
    grant = await access.authorize_subscribe(token, checked) if access.enabled else None
    return Plan(checked, cursor=resume, expires_at=grant.expires_at if grant is not None else 0.0)


def native_plan_now(access: Access, topics: tuple[str, ...], token: str | None) -> Plan | None:
    """:func:`native_plan` of a fresh stream of checked ``topics``, when it needs no awaiting; else None.

    That is when access control is off, or the verifier already holds the
    token's answer (no signature is checked here). None means "not here":
    the caller hands the request to the app, which decides it the long way.
    """
    if not access.enabled:
        return Plan(topics)
    allowed, grant = access.authorize_subscribe_now(token, topics)
    if not allowed:
        return None
    return Plan(topics, expires_at=grant.expires_at if grant is not None else 0.0)


async def open_subscription(
    hub: Hub,
    plan: Plan,
    *,
    retry_ms: int,
    heartbeat: float,
    on_overflow: Callable[[], None] | None,
) -> Response:
    """The answer to a planned subscription (a stream, or "come back"), its connect counted."""
    response = await _open(hub, plan, retry_ms, heartbeat, on_overflow)
    response.raw_headers.extend(plan.headers)
    outcome = connect_outcome(response)
    if outcome is not None:
        hub.metrics.connect(outcome)
    return response


async def _open(
    hub: Hub, plan: Plan, retry_ms: int, heartbeat: float, on_overflow: Callable[[], None] | None
) -> Response:
    try:
        connection = hub.admit(plan.topics, on_overflow, selection=plan.selection)
    except Refused as exc:
        return RetryLaterResponse(retry_ms, str(exc), outcome=f"retry_{exc.reason}")
    if plan.expires_at:
        hub.expire_at(connection, plan.expires_at)
    opened: Opened | None
    try:
        opened = await hub.open(connection, plan.cursor)
    except BrokerUnavailable:
        if not plan.may_wait:
            hub.detach(connection)
            retry = RetryLaterResponse(retry_ms, "waiting for the broker", outcome="retry_broker")
            if plan.cursor is not None and plan.cursor_header is not None:
                retry.raw_headers.append((plan.cursor_header, plan.cursor.encode()))
            return retry
        opened = None
    except BaseException:
        hub.detach(connection)
        raise
    response = EventStreamResponse(
        hub,
        connection,
        opened,
        resume=plan.cursor,  # (a plan that may not wait never streams without an opening: no resume to wait with)
        retry_ms=retry_ms,
        heartbeat=heartbeat,
        hooks=plan.hooks,
    )
    if opened is not None:
        response.raw_headers.extend(opened.headers)
    return response


def open_subscription_now(
    hub: Hub, plan: Plan, on_overflow: Callable[[], None] | None
) -> tuple[Connection, int, int | str] | None:
    """:func:`open_subscription` of a fresh native stream in one step, when nothing needs awaiting.

    The connection, registered and live from the returned position (and what the client is told there: the
    position, or its cursor); None
    when the hub can't do it at once (:meth:`api.core.hub.Hub.open_now`):
    then nothing is registered or counted, and the caller takes the long way.
    """
    opened = hub.open_now(plan.topics, on_overflow)
    if opened is None:
        return None
    if plan.expires_at:
        hub.expire_at(opened[0], plan.expires_at)
    hub.metrics.connect("accepted")
    return opened


def keys_unavailable(hub: Hub, retry_ms: int, exc: KeysUnavailable) -> Response:
    """The answer to a subscribe whose token can't be checked now (JWKS unreachable): come back, counted."""
    hub.metrics.connect("retry_keys")
    return RetryLaterResponse(retry_ms, str(exc), outcome="retry_keys")


def count_refusal(hub: Hub, exc: RequestRejected | Denied) -> None:
    """A subscribe refused for the client's own mistake, counted (``herald_connects_total``)."""
    if isinstance(exc, RequestRejected):
        hub.metrics.connect("bad_request")
    else:
        hub.metrics.connect("unauthorized" if exc.status_code == 401 else "forbidden")
