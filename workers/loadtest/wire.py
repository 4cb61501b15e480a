"""What the load tool puts on the wire and reads back: HTTP/1.1 framing and its event payload.

Everything here works on bytes in bulk. A subscriber gets many events per
read (the server coalesces them), so it splits whole frames off with
``rfind`` and pulls every payload out of a block with one compiled regex:
the per-event Python work is three ``int()`` calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DATA_LINE = b"\ndata: "
"""What starts each data line (every frame starts with ``id:``, so a data line follows a line break).

A load event's data is ``<topic index> <sequence> <publish time, ns since the epoch> <padding>``.
"""

_FIELD_END = re.compile(rb"[\r\n]")


def payload(topic: int, seq: int, sent_ns: int, size: int) -> str:
    """The data of one load event, padded with ``x`` to ``size`` bytes (never shorter than its fields)."""
    head = f"{topic} {seq} {sent_ns} "
    return head + "x" * max(0, size - len(head))


class ChunkedDecoder:
    """Incremental HTTP/1.1 chunked transfer decoding: feed raw bytes, get body bytes."""

    __slots__ = ("_left", "_raw", "_skip", "done")

    def __init__(self) -> None:
        self._raw = b""
        self._left = 0  # body bytes left in the current chunk
        self._skip = 0  # CRLF bytes after a chunk still to drop
        self.done = False  # the last (zero-size) chunk arrived

    def feed(self, raw: bytes) -> bytes:
        if not (self._raw or self._left or self._skip):
            # The common case, one whole chunk per read: a few slices, no loop.
            line_end = raw.find(b"\r\n")
            if 0 < line_end < 9:  # "1f40\r\n": no extensions, a sane size
                try:
                    size = int(raw[:line_end], 16)
                except ValueError:
                    size = 0
                end = line_end + 2 + size
                if size and len(raw) == end + 2 and raw.endswith(b"\r\n"):
                    return raw[line_end + 2 : end]
        data = self._raw + raw if self._raw else raw
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            if self._skip:
                dropped = min(self._skip, end - pos)
                pos += dropped
                self._skip -= dropped
            elif self._left:
                take = min(self._left, end - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._skip = 2
            else:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    break
                self._left = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if not self._left:
                    self.done = True
        self._raw = data[pos:] if not self.done else b""
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str]

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()


def parse_head(raw: bytes) -> ResponseHead:
    """The status and headers (lower-cased names) of an HTTP/1.x response head, without its blank line."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return ResponseHead(int(parts[1]), headers)


def last_field(block: bytes, name: bytes) -> bytes | None:
    """The value of the last ``name: value`` line in ``block`` (complete frames), if any."""
    at = block.rfind(b"\n" + name)
    if at < 0:
        if not block.startswith(name):
            return None
        at = -1
    start = at + 1 + len(name)
    match = _FIELD_END.search(block, start)
    value = block[start : match.start() if match else len(block)]
    return value[1:] if value.startswith(b" ") else value


def get_request(host: str, path: str, last_event_id: str | None, token: str | None = None) -> bytes:
    """An EventSource's request: ``Accept: text/event-stream``, ``Last-Event-ID`` when resuming.

    ``token``: Herald's access token, sent as ``Authorization: Bearer`` (a
    header rather than ``?access_token=``: the request line stays short).
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if last_event_id is not None:
        lines.append(f"Last-Event-ID: {last_event_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


ERROR_BODY_LIMIT = 4096
"""Bytes of a non-200 answer's body read to find its cause (Herald's are small JSON documents)."""

TIMEOUT = "timeout"
CLOSED_BEFORE_ANSWER = "closed before answering"
BAD_RESPONSE = "not an HTTP response"
NOT_EVENT_STREAM = "200 but not text/event-stream"
SILENT = "silent"
"""Why an open stream ended (a drop) when its subscriber closed it: no byte for its silence limit (a hung node)."""
ERRNO_CAUSES = {
    "ECONNREFUSED": "connection refused",
    "ECONNRESET": "connection reset",
    "ETIMEDOUT": TIMEOUT,
    "EMFILE": "out of file descriptors",
    "ENFILE": "out of file descriptors",
    "EADDRNOTAVAIL": "no local port free",
    "EHOSTUNREACH": "unreachable",
    "ENETUNREACH": "unreachable",
}
"""Why a connect failed, by errno name: the causes a subscriber reports (the C worker has the same table)."""


def errno_cause(name: str) -> str:
    """The cause of a failed connect with errno ``name`` (an unknown one is reported as its name)."""
    return ERRNO_CAUSES.get(name, name)


def is_event_stream(head: ResponseHead) -> bool:
    """Whether a response is an event stream (``text/event-stream``, any parameters)."""
    return head.headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream"


def answer_cause(head: ResponseHead, body: bytes) -> str:
    """The cause of an answer a subscriber cannot stream from: its status and a few words.

    ``"503 broker unavailable"`` (a JSON ``detail``, up to its first colon,
    as Herald answers), ``"502 from the proxy"`` (nginx's own page: no
    ``X-Node-Id``), ``"404 from the server"`` (anything else), or
    :data:`NOT_EVENT_STREAM` for a 200 of another type.
    """
    if head.status == 200:
        return NOT_EVENT_STREAM
    detail = _json_detail(body[:ERROR_BODY_LIMIT])
    if detail:
        return f"{head.status} {detail}"
    if "x-node-id" not in head.headers and head.headers.get("server", "").lower().startswith("nginx"):
        return f"{head.status} from the proxy"
    return f"{head.status} from the server"


_DETAIL = re.compile(rb'"detail"\s*:\s*"([^"\\]{1,200})')


def _json_detail(body: bytes) -> str:
    """A JSON error body's ``detail`` string, up to its first colon, lower case, at most 48 characters."""
    match = _DETAIL.search(body)
    if not match:
        return ""
    text = match.group(1).decode("utf-8", "replace").split(":", 1)[0].strip().lower()
    return text[:48]
