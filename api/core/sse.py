"""Server-Sent Events wire format (WHATWG HTML, "Server-sent events").

Everything here returns ready-to-send UTF-8 bytes. An event is encoded once,
when it reaches the node, and the same bytes go to every client.

Why CR, LF and NUL need care: the event-stream format is line based, and a
line ends at CR, LF or CRLF. A payload line break that reached the wire
unchanged would end the ``data:`` line and start a new field, so a producer
could inject ``id:`` or ``event:`` fields into everyone's stream. Payload
line breaks therefore become separate ``data:`` lines, which a conforming
parser joins back with LF. Ids and event types can't carry line breaks at all
(the publish endpoint only admits a small character set), and ids are decimal
digits, so the NUL rule of the ``id`` field (a value with NUL is ignored)
never applies. NUL inside data is not special to the format and passes as is.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

HEARTBEAT = b":\n\n"
"""A comment line: keeps proxies and clients from timing out an idle stream."""

CUT_OFF_NOTICE = (
    b": cut off: this client fell further behind than HERALD_CLIENT_BUFFER allows;"
    b" reconnect with Last-Event-ID to resume\n\n"
)
"""What a client cut off for falling behind reads last (a comment: EventSource reconnects and resumes by itself)."""

FRAME_OVERHEAD = len("id: 18446744073709551615\n\n")
"""Bytes of a frame besides its ``event`` and ``data`` lines, at most (the longest id)."""


def frame_size(data: str, event_type: str | None, data_bytes: int) -> int:
    """At most the bytes of :func:`event_frame` for ``data`` (``data_bytes`` of UTF-8) and ``event_type``."""
    lines = 1 + data.count("\n") + data.count("\r")
    event_line = 0 if event_type is None else len("event: \n") + utf8_size(event_type)
    return FRAME_OVERHEAD + event_line + data_bytes + lines * len("data: \n")


def encode_data(value: Any) -> str:
    """The payload text of a published JSON value: strings as is, the rest compact JSON.

    Raises ValueError for values that JSON can't carry (NaN, infinities).
    """
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_frame(event_id: int | str | None, data: str, event_type: str | None = None) -> bytes:
    """One complete event: ``id``, optional ``event``, ``data`` lines, blank line.

    Only line breaks split ``data`` (not the other characters that
    :meth:`str.splitlines` treats as breaks, which SSE does not).
    """
    head = "" if event_id is None else f"id: {event_id}\n"
    if event_type is not None:
        head += f"event: {event_type}\n"
    body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"{head}{body}\n".encode()


def preamble(retry_ms: int, position: int | str | None) -> bytes:
    """The first bytes of every stream: the reconnect hint, and for a new client its position.

    ``id:`` without ``data:`` dispatches no event, but a conforming client
    still records the id as its last event id. So a client that reconnects
    before any event reached it resumes from where it started, instead of
    silently missing what was published while it was away. A resuming client
    gets no position here: its replay carries the ids.
    """
    marker = "" if position is None else f"id: {position}\n"
    return f"retry: {retry_ms}\n{marker}\n".encode()


def retry_notice(retry_ms: int, why: str) -> bytes:
    """The reconnect hint and a comment saying why: how a stream that can't be served now begins.

    Followed by the end of the stream, it tells EventSource to come back in
    ``retry_ms`` (with its ``Last-Event-ID``): a 200 it retries, where any
    error status would end it for good. Followed by more, it opens a stream
    that waits; no ``id:`` then, the position comes once the stream knows it
    (:func:`position_frame`).
    """
    return f"retry: {retry_ms}\n: {_one_line(why)}\n\n".encode()


def position_frame(position: int | str) -> bytes:
    """``id:`` without data: the client records its position and nothing is dispatched (see :func:`preamble`)."""
    return f"id: {position}\n\n".encode()


def _one_line(text: str) -> str:
    return _LINE_BREAK.sub(" ", text)


def reset_frame(reason: str, topics: tuple[str, ...], position: int | str | None) -> bytes:
    """The ``reset`` event: the client's resume cannot be exact for ``topics``.

    It carries ``position`` as its id when no replayed event follows it, so a
    client that reconnects right after it does not receive the same reset.
    """
    data = json.dumps({"reason": reason, "topics": list(topics)}, separators=(",", ":"))
    return event_frame(position, data, "reset")


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8; raises UnicodeEncodeError for lone surrogates."""
    return len(text.encode("utf-8"))
