"""``POST /publish``: validate a whole request, then publish it atomically.

Nothing is published unless every event of the request is valid, so a
producer never has to work out which half of a batch went through.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from api.auth.access import Access, Denied
from api.auth.credentials import bearer_token
from api.auth.keys import KeysUnavailable
from api.bodies import BodyTooLarge, read_body
from api.core.sse import encode_data, frame_size, utf8_size
from api.deps import AccessDep, BrokerDep, HubDep, SettingsDep
from api.errors import RequestRejected
from api.models import MAX_BATCH, PublishBatch, Published, PublishEvent, is_reserved
from api.settings import Settings
from broker.base import Broker, BrokerUnavailable, IdempotencyConflict, Message

router = APIRouter()

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
"""Printable ASCII without spaces, like a UUID or a producer's own message id."""

_ONE = TypeAdapter(PublishEvent)
_MANY: TypeAdapter[list[PublishEvent]] = TypeAdapter(PublishBatch)


def _no_constants(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity; JSON does not, and no client
    # could parse them back.
    raise ValueError(f"{name} is not valid JSON")


async def _read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_body(request, limit)
    except BodyTooLarge as exc:
        raise RequestRejected(413, str(exc)) from None


def _check_content_type(request: Request) -> None:
    """Only ``application/json``: a browser sends a cross-site ``text/plain`` (or form) POST without a
    CORS preflight, so accepting one would let any page a user opens publish through their browser."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = media_type or "none"
        raise RequestRejected(415, f"send the events as Content-Type: application/json (got {shown})")


def _parse(body: bytes) -> Any:
    if not body.strip():
        raise RequestRejected(400, "request body is empty: send a JSON event or an array of events")
    try:
        return json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise RequestRejected(400, f"request body is not valid JSON: {exc}") from None


def _validate(payload: Any) -> tuple[list[PublishEvent], bool]:
    try:
        if isinstance(payload, list):
            if len(payload) > MAX_BATCH:
                raise RequestRejected(422, f"a batch holds at most {MAX_BATCH} events, got {len(payload)}")
            return _MANY.validate_python(payload), True
        return [_ONE.validate_python(payload)], False
    except ValidationError as exc:
        raise RequestRejected(422, exc.errors(include_url=False, include_context=False)) from None


def _message(index: int, item: PublishEvent, max_bytes: int) -> tuple[Message, int]:
    """The event as the broker takes it, and at most how many bytes it is as a frame on a stream."""
    where = f"event {index}: " if index >= 0 else ""
    try:
        data = encode_data(item.data)
        size = utf8_size(data)
    except ValueError as exc:  # NaN from a huge number, or a lone surrogate
        raise RequestRejected(422, f"{where}data can't be sent: {exc}") from None
    if size > max_bytes:
        raise RequestRejected(413, f"{where}data is {size} bytes encoded, over the limit of {max_bytes}")
    return Message(item.topic, data, item.event), frame_size(data, item.event, size)


def _messages(items: list[PublishEvent], many: bool, settings: Settings) -> list[Message]:
    """The request's events, refused (413) when together they would not fit in a subscriber's buffer.

    A batch reaches a subscriber's queue all at once, before any of it can
    be written. Past ``HERALD_CLIENT_BUFFER`` that subscriber would be cut
    off however fast it reads, so the node does not accept what it could not
    deliver: an accepted publish always fits.
    """
    sized = [_message(i if many else -1, item, settings.max_event_bytes) for i, item in enumerate(items)]
    total = sum(size for _, size in sized)
    if total > settings.client_buffer:
        raise RequestRejected(
            413,
            f"these events are {total} bytes as a stream's frames, over HERALD_CLIENT_BUFFER ({settings.client_buffer}"
            " bytes, what a subscriber may have queued): a subscriber could not take them at once. Publish them in"
            " smaller batches.",
        )
    return [message for message, _ in sized]


@router.post(
    "/publish",
    status_code=201,
    response_model=Published | list[Published],
    summary="Publish one event or a batch",
    responses={
        401: {"description": "Access control is on and there is no usable Authorization: Bearer token."},
        403: {"description": "The token does not allow publishing to one of the topics; nothing was published."},
        413: {"description": "The body, or one event's encoded data, is too large."},
        415: {"description": "The body is not sent as application/json."},
        400: {"description": "The body is not JSON, or the Idempotency-Key is malformed."},
        422: {
            "description": "A field is missing or invalid, or the Idempotency-Key was used for another request;"
            " nothing was published."
        },
        503: {"description": "The broker (or the token keys) are unavailable; retry after Retry-After seconds."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/PublishEvent"},
                            {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/PublishEvent"},
                                "maxItems": MAX_BATCH,
                                "minItems": 1,
                            },
                        ]
                    }
                }
            },
        }
    },
)
async def publish(
    request: Request,
    broker: BrokerDep,
    settings: SettingsDep,
    access: AccessDep,
    hub: HubDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            json_schema_extra={"pattern": _IDEMPOTENCY_KEY.pattern.join("^$")},
            description="Retry-safe publishing: a request repeated with the same key (within the replay TTL) "
            "publishes nothing again and answers the first request's ids.",
        ),
    ] = None,
) -> JSONResponse:
    """Publish an event, or an array of up to 1000 events in order, atomically.

    Answers 201 with ``{"id", "topic"}`` (an array of them for an array). With access
    control on, the ``Authorization: Bearer`` token must allow publishing to every
    topic of the request, or nothing of it is published.
    """
    metrics = hub.metrics
    started = time.perf_counter()
    try:
        published = await _publish(request, broker, settings, access, idempotency_key)
    except (RequestRejected, Denied) as exc:
        metrics.publish_failed(exc.status_code)
        raise
    except IdempotencyConflict:
        metrics.publish_failed(422)
        raise
    except (BrokerUnavailable, KeysUnavailable):
        metrics.publish_failed(503)
        raise
    metrics.published(len(published) if isinstance(published, list) else 1, time.perf_counter() - started)
    return JSONResponse(published, status_code=201)


async def _publish(
    request: Request, broker: Broker, settings: Settings, access: Access, idempotency_key: str | None
) -> list[dict[str, str]] | dict[str, str]:
    """What ``POST /publish`` does: the events' ids (one, or a list for a batch), once published."""
    grant = await access.authenticate_publisher(bearer_token(request.scope["headers"]))
    _check_content_type(request)
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise RequestRejected(400, "Idempotency-Key must be 1-200 printable ASCII characters without spaces")
    payload = _parse(await _read_body(request, settings.max_body_bytes))
    items, many = _validate(payload)
    topics = list(dict.fromkeys(item.topic for item in items))
    reserved = next((t for t in topics if is_reserved(t)), None)
    if reserved is not None:
        raise RequestRejected(403, f"topic {reserved!r} is reserved for the nodes' own figures")
    access.check_publish(grant, topics)
    messages = _messages(items, many, settings)
    events = await broker.publish(messages, idempotency_key)
    published = [{"id": str(e.id), "topic": e.topic} for e in events]
    return published if many else published[0]
