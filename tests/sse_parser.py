"""A WHATWG-conformant event-stream parser, written from the spec's algorithm.

HTML Living Standard, "Server-sent events", section "Event stream
interpretation": lines end at CRLF, LF or CR; a blank line dispatches; a line
starting with a colon is a comment; the field name is everything before the
first colon and one leading space of the value is dropped; ``data`` appends
value + LF; ``event`` sets the type; ``id`` sets the last event id unless the
value contains NUL; ``retry`` takes ASCII digits only. On dispatch the last
event id string is set, an empty data buffer dispatches nothing, and one
trailing LF is removed from the data.

It is fed bytes as they come off the socket, in chunks of any size.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SSEEvent:
    """A dispatched event, as a browser's EventSource would hand it to a listener."""

    type: str
    data: str
    last_event_id: str


@dataclass
class SSEParser:
    """Incremental parser. :meth:`feed` returns the events each chunk completed."""

    last_event_id: str = ""
    retry: int | None = None
    comments: int = 0
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    _line: list[str] = field(default_factory=list)
    _pending_cr: bool = False
    _data: list[str] = field(default_factory=list)
    _type: str = ""
    _id_buffer: str = ""
    _bom_checked: bool = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._decoder.decode(chunk)
        if not self._bom_checked and text:
            self._bom_checked = True
            text = text.removeprefix("\ufeff")
        events: list[SSEEvent] = []
        for char in text:
            if self._pending_cr:
                self._pending_cr = False
                if char == "\n":
                    continue  # the LF of a CRLF pair
            if char == "\r":
                self._pending_cr = True
                self._end_line(events)
            elif char == "\n":
                self._end_line(events)
            else:
                self._line.append(char)
        return events

    def _end_line(self, events: list[SSEEvent]) -> None:
        line = "".join(self._line)
        self._line.clear()
        if line == "":
            self._dispatch(events)
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value + "\n")
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value and all("0" <= c <= "9" for c in value):
            self.retry = int(value)

    def _dispatch(self, events: list[SSEEvent]) -> None:
        self.last_event_id = self._id_buffer
        data = "".join(self._data)
        self._data.clear()
        event_type, self._type = self._type, ""
        if data == "":
            return
        events.append(SSEEvent(event_type or "message", data.removesuffix("\n"), self.last_event_id))
