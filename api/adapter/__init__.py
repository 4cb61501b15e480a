"""The one seam between Herald and its HTTP server's internals, and the gate in front of it.

Herald serves with uvicorn. Through ASGI alone a stream costs a request
cycle, a task and a watcher task for as long as it is open, writes every
chunk through ``send`` and can't drop a stalled client's socket. So the node
goes past ASGI, and everything that does lives in this package, nowhere
else:

* :mod:`api.adapter.protocol`: Herald's HTTP protocol, a subclass of
  uvicorn's httptools protocol (lighter per connection, calls a stream back
  when its client goes away);
* :mod:`api.adapter.writes`: the stream's head and body chunks written
  straight to uvicorn's transport, framed as uvicorn frames them, and the
  transport's ``abort`` for a client cut off;
* :mod:`api.adapter.lane`: ``GET /events`` answered from the protocol's
  ``on_headers_complete``, with no request cycle at all.

The rest of the node asks only :data:`active` (a :class:`ServerHooks`), whose
stock answers are plain ASGI. Those internals are private to uvicorn and
change between its releases, so the adapter is used only with a uvicorn it
was tested with (:data:`TESTED_UVICORN`, the version ``uv.lock`` pins):
under any other, the node logs one warning and serves every request through
stock uvicorn and the ASGI app, correct and slower, rather than patch
internals it does not know. ``HERALD_UVICORN_ADAPTER`` overrides the choice
(``on`` to try the adapter on a new uvicorn, as ``make upgrade-check`` does;
``off`` for stock uvicorn always). Nothing here imports uvicorn's internals
until the adapter is chosen.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import uvicorn
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from api.adapter.guard import ConnectionGuard
    from api.adapter.lane import StreamLane
    from api.auth.access import Access
    from api.auth.cors import Cors
    from api.core.connection import DirectWriter
    from api.core.hub import Hub
    from api.settings import Settings

TESTED_UVICORN: tuple[str, ...] = ("0.55.0",)
"""The uvicorn releases the adapter was tested with (the whole suite, ``make test``). A unit test checks that
``uv.lock`` pins one of them: bumping uvicorn in the lock means testing the adapter on it and adding it here."""

Mode = Literal["auto", "on", "off"]
MODES: tuple[Mode, ...] = ("auto", "on", "off")

DIRECT_WRITES = "herald.direct_writes"
"""Scope key: true when nothing outside the app wraps the server's ``send`` (set by :class:`api.app.HeraldApp`)."""


class DisconnectNotifier(Protocol):
    """The server's side of a connection that calls ``on_lost`` once its client is gone."""

    on_lost: Callable[[], None] | None


class ServerHooks:
    """What the node asks of its HTTP server beyond ASGI. These are the stock answers: ASGI only.

    Every method is called once per stream (never per event), so the
    indirection costs nothing on the fan-out path.
    """

    name = "stock uvicorn (ASGI only)"
    http: type[asyncio.Protocol] | str = "httptools"
    """What ``uvicorn.Config(http=...)`` serves with."""

    def direct_writes(self, receive: Receive, send: Send) -> bool:
        """Whether streams of this request may write to the transport themselves (see :data:`DIRECT_WRITES`)."""
        return False

    def direct_writer(self, scope: Scope, receive: Receive) -> DirectWriter | None:
        """A writer straight to the client's socket for a live stream, or None: chunks go through ``send``."""
        return None

    async def send_head(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """``http.response.start`` (status 200, ``headers``), then ``body`` as the body's first bytes, more to come."""
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})

    def disconnect_notifier(self, receive: Receive, on_lost: Callable[[], None]) -> DisconnectNotifier | None:
        """Have ``on_lost`` called once the client is gone (at once if it already is); the notifier, to clear its
        ``on_lost`` when the stream ends. None: the server can't, and the stream waits in ``receive()`` instead."""
        return None

    def aborter(self, receive: Receive) -> Callable[[], None] | None:
        """A way to drop the client's TCP connection at once (a client cut off for falling behind), or None:
        the stream then ends its response normally."""
        return None

    def stream_lane(self, hub: Hub, settings: Settings, access: Access, cors: Cors) -> StreamLane | None:
        """What answers streams from the protocol itself (:mod:`api.adapter.lane`), or None."""
        return None

    def connection_guard(self, settings: Settings) -> ConnectionGuard | None:
        """Deadlines and caps for requests not in yet (:mod:`api.adapter.guard`), or None: the server's own."""
        return None


STOCK = ServerHooks()


@dataclass(frozen=True)
class Choice:
    """Which hooks serve, and why (for the node's log)."""

    hooks: ServerHooks
    uvicorn_version: str
    mode: Mode
    tested: bool

    @property
    def adapter(self) -> bool:
        return self.hooks is not STOCK

    def warning(self) -> str | None:
        """The one line the node logs when the choice is not the tested default, else None."""
        if self.mode == "auto" and not self.tested:
            return (
                f"uvicorn {self.uvicorn_version} is not a version Herald's HTTP adapter was tested with"
                f" ({', '.join(TESTED_UVICORN)}): serving every request through stock uvicorn and the ASGI app"
                " (correct, slower). Install the locked versions (make setup), or set HERALD_UVICORN_ADAPTER=on"
                " to try the adapter anyway."
            )
        if self.mode == "on" and not self.tested:
            return (
                f"HERALD_UVICORN_ADAPTER=on: Herald's HTTP adapter drives uvicorn {self.uvicorn_version}, a version"
                f" it was not tested with ({', '.join(TESTED_UVICORN)})"
            )
        if self.mode == "off":
            return "HERALD_UVICORN_ADAPTER=off: serving through stock uvicorn and the ASGI app (correct, slower)"
        return None


def choose(mode: Mode, uvicorn_version: str | None = None) -> Choice:
    """The hooks for ``mode`` with this uvicorn: the adapter's when tested with it (or forced ``on``), else stock."""
    if mode not in MODES:
        raise ValueError(f"HERALD_UVICORN_ADAPTER is one of {', '.join(MODES)}, got {mode!r}")
    version = uvicorn.__version__ if uvicorn_version is None else uvicorn_version
    tested = version in TESTED_UVICORN
    use = mode == "on" or (mode == "auto" and tested)
    hooks = importlib.import_module("api.adapter.writes").UVICORN_HOOKS if use else STOCK
    return Choice(hooks, version, mode, tested)


active: ServerHooks = choose("auto").hooks
"""The hooks the node serves with: the adapter's with a tested uvicorn, else :data:`STOCK`. Set by :func:`install`
(the node's settings); read as ``adapter.active`` at each use, so a new choice takes effect at once."""


def install(mode: Mode) -> Choice:
    """Serve with the hooks ``mode`` chooses (see :func:`choose`), from now on, in this process."""
    global active
    choice = choose(mode)
    active = choice.hooks
    return choice


def exit_cleanly_after_shutdown(server: uvicorn.Server) -> None:
    """Keep uvicorn from re-raising the stop signal after a clean shutdown, so the node exits 0, not "killed".

    uvicorn keeps the signals it caught in a private list and raises them
    again once it has shut down. Whatever uvicorn is installed this only
    clears that list when it is there: without it, the node still stops,
    by its signal.
    """
    captured: Any = getattr(server, "_captured_signals", None)
    if isinstance(captured, list):
        captured.clear()
