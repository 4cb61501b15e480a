"""Request and response bodies of the HTTP API, and the names they accept."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

TOPIC_PATTERN = r"^[A-Za-z0-9_\-.:/@]{1,200}$"
"""Topic names: 1-200 letters, digits and ``_ - . : / @``."""

EVENT_TYPE_PATTERN = r"^[A-Za-z0-9_\-.:]{1,64}$"
"""Event types: 1-64 letters, digits and ``_ - . :``. No space, CR or LF can
reach the ``event:`` line, so a type can't end its line and inject a field."""

RESERVED_EVENT_TYPES = frozenset({"reset"})
"""Types only Herald sends: a producer's ``reset`` would be mistaken for Herald's."""

MAX_BATCH = 1000

_TOPIC = re.compile(TOPIC_PATTERN.removeprefix("^").removesuffix("$"))


RESERVED_TOPIC_PREFIX = "_herald/"
"""Topics of the nodes themselves (their figures, ``_herald/nodes``): producers may not publish there,
and with access control on only an admin token may read them."""


def is_reserved(topic: str) -> bool:
    return topic.startswith(RESERVED_TOPIC_PREFIX)


def is_topic(name: str) -> bool:
    return _TOPIC.fullmatch(name) is not None


class PublishEvent(BaseModel):
    """One event to publish."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"topic": "news", "data": {"n": 1}}]})

    topic: Annotated[str, Field(pattern=TOPIC_PATTERN, description="Topic to publish on.")]
    data: JsonValue = Field(description="A JSON string is sent as is; any other JSON value as compact JSON.")
    event: Annotated[str, Field(pattern=EVENT_TYPE_PATTERN, description="SSE event type (optional).")] | None = None

    @field_validator("event")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        if value in RESERVED_EVENT_TYPES:
            raise ValueError(f"event type {value!r} is reserved for Herald")
        return value


PublishBatch = Annotated[list[PublishEvent], Field(min_length=1, max_length=MAX_BATCH)]
"""An array of events, validated as a whole and published in order."""


class Published(BaseModel):
    """What publishing an event gave it: its id, on its topic."""

    id: str = Field(description="Decimal event id, increasing across the deployment.")
    topic: str
