"""``GET /events``: subscribe to topics over Server-Sent Events, resuming where the client left."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from api.deps import HubDep, SettingsDep
from api.errors import RequestRejected
from api.models import is_topic
from api.stream import EventStreamResponse, transport_aborter

router = APIRouter()


def _topics(request: Request, max_topics: int) -> list[str]:
    topics = request.query_params.getlist("topic")
    if not topics:
        raise RequestRejected(400, "give at least one topic: /events?topic=NAME")
    if len(topics) > max_topics:
        raise RequestRejected(400, f"at most {max_topics} topics per connection, got {len(topics)}")
    bad = [t for t in topics if not is_topic(t)]
    if bad:
        raise RequestRejected(400, f"invalid topic name {bad[0][:210]!r}: use 1-200 letters, digits and _ - . : / @")
    # A topic named twice is one subscription, kept in the order first given.
    return list(dict.fromkeys(topics))


@router.get(
    "/events",
    response_class=Response,
    summary="Subscribe to topics (Server-Sent Events)",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        400: {"description": "No topic, an invalid topic name or too many topics."},
        503: {"description": "The broker is unavailable."},
    },
)
async def events(
    request: Request,
    hub: HubDep,
    settings: SettingsDep,
    topic: Annotated[list[str] | None, Query(description="Topic to subscribe to; repeat for more.")] = None,
    last_event_id: Annotated[
        str | None, Query(description="Resume after this id, when the Last-Event-ID header can't be set.")
    ] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """Stream the topics' events; with ``Last-Event-ID``, first everything missed since that id.

    The stream starts with ``retry:``; each event has ``id:``, ``event:`` when
    it has a type, and ``data:`` lines. A ``reset`` event says the resume
    could not be exact. Comment lines keep an idle stream alive.
    """
    topics = _topics(request, settings.max_topics)
    resume = last_event_id_header if last_event_id_header is not None else last_event_id
    if resume is not None and not resume.strip():
        resume = None  # an empty id means "no id yet", as EventSource sends it
    opened = await hub.connect(topics, resume, on_overflow=transport_aborter(request.receive))
    return EventStreamResponse(hub, opened, settings.retry_ms)
