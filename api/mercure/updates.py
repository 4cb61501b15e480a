"""Mercure updates: the publish form, the update as it travels through the broker, and its SSE frame.

Every Mercure update is published through Herald's broker as **one event on
the reserved topic** :data:`UPDATES_TOPIC` (producers can't publish there:
``api.models.is_reserved``). Its data is the update as compact JSON, the
*update contract*, version 1::

    {"v": 1, "t": ["<canonical topic>", "<alternate>", ...], "d": "<data>",
     "p": true, "y": "<type>", "r": "<retry digits>", "i": "<publisher-supplied id>"}

``v``, ``t`` and ``d`` are always there; ``p``, ``y``, ``r``, ``i`` only when
the publisher sent them (``p`` only when true). A reader ignores members it
does not know, and skips (never delivers) an event that is not such a
document (a later version, or something written to Redis by hand).

So the updates of the whole deployment form one ordered sequence with
Herald's ids: its replay buffer (size ``HERALD_REPLAY_SIZE``, age
``HERALD_REPLAY_TTL``: for this topic, *hub-wide*), exact resume on any
node, the Redis feed's backfill and failover handling all apply unchanged.

Event ids: an update published with an ``id`` keeps it as its SSE id (the
publish answer echoes it); any other update's id is ``#<herald id>``, a
fragment as the spec allows for hub-generated ids (a publisher's id may not
start with ``#``, so the two never collide). A cursor (``Last-Event-ID``) of
the ``#<n>`` form is a position in the sequence; a publisher's id is found by
scanning the retained updates (the earliest one carrying it wins).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from api.mercure.matchers import describe_character, forbidden_character
from api.models import EVENT_TYPE_PATTERN, RESERVED_EVENT_TYPES, RESERVED_TOPIC_PREFIX, is_reserved, is_topic
from broker.base import Message

UPDATES_TOPIC = RESERVED_TOPIC_PREFIX + "mercure"
"""The broker topic every Mercure update is published on (one hub-wide sequence)."""

CONTRACT_VERSION = 1

EARLIEST = "earliest"
"""The reserved cursor: every retained update (and the ``Mercure-Last-Event-ID`` of a resume that can't be exact)."""

RESERVED_TYPE = "mercure"
"""The event type Mercure keeps for the hub's own events: publishers may not use it."""

FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"

# Implementation-defined limits of the publish form (the spec asks for some; past them: 413).
MAX_TOPICS = 100
"""``topic`` fields of one update (the canonical topic and its alternates)."""
MAX_TOPIC_BYTES = 2048
"""UTF-8 bytes of one topic."""
MAX_ID_BYTES = 1024
"""UTF-8 bytes of a publisher-supplied id (it comes back in ``Last-Event-ID`` headers)."""
MAX_TYPE_BYTES = 256
"""UTF-8 bytes of an event type."""
MAX_RETRY_DIGITS = 10
"""Digits of a ``retry`` value (over a year in milliseconds)."""
MAX_FIELDS = MAX_TOPICS + 100
"""Fields of one form, unknown ones included (they are ignored, but still parsed)."""

_HUB_ID = re.compile(r"#([0-9]{1,19})")
_NATIVE_TYPE = re.compile(EVENT_TYPE_PATTERN)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class PublicationError(Exception):
    """A publish request the hub refuses: ``status`` (400, 403, 413, 415) and why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Update:
    """One Mercure update: its topics (canonical first), data, privacy and SSE fields."""

    topics: tuple[str, ...]
    data: str = ""
    private: bool = False
    type: str | None = None
    retry: str | None = None
    """Digits of the SSE ``retry`` field, as published."""
    id: str | None = None
    """The publisher-supplied id, when there was one."""

    def encode(self) -> str:
        """The update contract's JSON (see the module docstring)."""
        document: dict[str, Any] = {"v": CONTRACT_VERSION, "t": list(self.topics), "d": self.data}
        if self.private:
            document["p"] = True
        if self.type is not None:
            document["y"] = self.type
        if self.retry is not None:
            document["r"] = self.retry
        if self.id is not None:
            document["i"] = self.id
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> Update | None:
        """The update of a contract document; None for anything else (it is skipped, never delivered)."""
        try:
            document = json.loads(text)
        except ValueError:
            return None
        if not isinstance(document, dict) or document.get("v") != CONTRACT_VERSION:
            return None
        topics, data = document.get("t"), document.get("d", "")
        if not isinstance(topics, list) or not topics or not all(isinstance(t, str) for t in topics):
            return None
        optional = [document.get(name) for name in ("y", "r", "i")]
        if not isinstance(data, str) or not all(value is None or isinstance(value, str) for value in optional):
            return None
        kind, retry, update_id = optional
        return cls(tuple(topics), data, document.get("p") is True, kind, retry, update_id)

    def sse_id(self, herald_id: int) -> str:
        """The update's id as subscribers see it: the publisher's, or ``#<herald id>``."""
        return self.id if self.id is not None else hub_id(herald_id)

    def frame(self, herald_id: int) -> bytes:
        """The SSE event: ``id``, ``event`` (a type), ``retry``, one ``data`` line per line of the data."""
        head = f"id: {self.sse_id(herald_id)}\n"
        if self.type:
            head += f"event: {self.type}\n"
        if self.retry is not None:
            head += f"retry: {self.retry}\n"
        body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(self.data))
        return f"{head}{body}\n".encode()


def native_messages(update: Update) -> list[Message]:
    """The native events a Mercure update is also published as (``HERALD_MERCURE_NATIVE``).

    The mapping is the identity: a **public** update becomes one native event
    on each of its topics (canonical and alternates, each once) whose string is
    a valid native topic name (``api.models.TOPIC_PATTERN``: ``https://example.com/books/1``
    is one) and not reserved; its data as is, its type as the native event type
    when it is a valid, unreserved one. Other topics are Mercure-only. A private update is
    never delivered natively: the native API's rules (``HERALD_PUBLIC_TOPICS``,
    tokens' ``subscribe`` selectors) are not the Mercure token's, and a topic
    public on one side must not leak what is private on the other.
    """
    if update.private:
        return []
    kind = update.type
    if kind is not None and (kind in RESERVED_EVENT_TYPES or not _NATIVE_TYPE.fullmatch(kind)):
        kind = None  # a native client must never see a "reset" it did not get from its node
    return [
        Message(topic, update.data, kind)
        for topic in dict.fromkeys(update.topics)
        if is_topic(topic) and not is_reserved(topic)
    ]


def hub_id(herald_id: int) -> str:
    """The id the hub gives an update without a publisher-supplied one (and a stream's position)."""
    return f"#{herald_id}"


def parse_hub_id(cursor: str) -> int | None:
    """The Herald id of a ``#<n>`` cursor; None for any other cursor."""
    match = _HUB_ID.fullmatch(cursor)
    return int(match.group(1)) if match else None


def position_frame(herald_id: int) -> bytes:
    """``id:`` without data: EventSource records the position and dispatches nothing."""
    return f"id: {hub_id(herald_id)}\n\n".encode()


# -- the publish form -------------------------------------------------------------


def check_media_type(content_type: str | None) -> None:
    """Only ``application/x-www-form-urlencoded`` (parameters such as a charset allowed); else 415."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != FORM_MEDIA_TYPE:
        raise PublicationError(415, f"send the update as Content-Type: {FORM_MEDIA_TYPE} (got {media_type or 'none'})")


def parse_form(body: bytes) -> list[tuple[str, str]]:
    """The name/value pairs of a form body; 400 when it is not UTF-8, 413 past :data:`MAX_FIELDS` fields."""
    try:
        text = body.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise PublicationError(400, "the form's names and values must be UTF-8") from None
    except ValueError:
        raise PublicationError(413, f"the form has more than {MAX_FIELDS} fields") from None


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def _check_characters(name: str, value: str) -> None:
    bad = forbidden_character(value)
    if bad is not None:
        raise PublicationError(400, f"{name} must not contain {describe_character(bad)}")


def read_update(fields: list[tuple[str, str]], max_data_bytes: int) -> Update:
    """The update a publish form describes, checked field by field (topics are checked by the caller).

    ``topic`` may repeat (the first is canonical, the others alternates);
    ``data``, ``id``, ``type`` and ``retry`` count once (the first given);
    ``private`` makes the update private whatever its value; other fields
    are ignored. Raises :class:`PublicationError` (400, or 413 past a limit).
    """
    topics: list[str] = []
    single: dict[str, str] = {}
    private = False
    for name, value in fields:
        if name == "topic":
            topics.append(value)
        elif name == "private":
            private = True
        elif name in ("data", "id", "type", "retry"):
            single.setdefault(name, value)
    if not topics:
        raise PublicationError(400, "the form needs a topic field")
    topics = list(dict.fromkeys(topics))  # an alternate named twice (or naming the canonical topic) counts once
    if len(topics) > MAX_TOPICS:
        raise PublicationError(413, f"at most {MAX_TOPICS} topic fields (a canonical topic and its alternates)")
    for topic in topics:
        if _utf8_size(topic) > MAX_TOPIC_BYTES:
            raise PublicationError(413, f"a topic is over the limit of {MAX_TOPIC_BYTES} bytes")
    data = single.get("data", "")
    if _utf8_size(data) > max_data_bytes:
        raise PublicationError(413, f"data is over the limit of {max_data_bytes} bytes")
    update_id = single.get("id") or None  # an empty id is no id: the hub makes one
    if update_id is not None:
        if _utf8_size(update_id) > MAX_ID_BYTES:
            raise PublicationError(413, f"id is over the limit of {MAX_ID_BYTES} bytes")
        _check_characters("id", update_id)
        if update_id.startswith("#"):
            raise PublicationError(400, "id may not start with # (the hub's own ids do)")
        if update_id == EARLIEST:
            raise PublicationError(400, f"id {EARLIEST!r} is reserved")
    kind = single.get("type") or None
    if kind is not None:
        if _utf8_size(kind) > MAX_TYPE_BYTES:
            raise PublicationError(413, f"type is over the limit of {MAX_TYPE_BYTES} bytes")
        _check_characters("type", kind)
        if kind == RESERVED_TYPE:
            raise PublicationError(400, f"type {RESERVED_TYPE!r} is reserved for the hub's own events")
    retry = single.get("retry") or None
    if retry is not None:
        if len(retry) > MAX_RETRY_DIGITS:
            raise PublicationError(413, f"retry is over the limit of {MAX_RETRY_DIGITS} digits")
        if not (retry.isascii() and retry.isdigit()):
            raise PublicationError(400, "retry must be ASCII digits only (milliseconds)")
    return Update(tuple(topics), data, private, kind, retry, update_id)
