"""Herald's HTTP protocol: uvicorn's httptools protocol, telling a stream at once when its client leaves.

ASGI reports a disconnect only to a task blocked in ``receive()``, so every
stream would need one more task (a coroutine chain and a future) for as long
as it is open, just to learn that its client went away. For idle streams
that task is most of what the app holds per connection, and its creation a
tenth of a connect's CPU (``make bench``: idle memory, 5,000 connects). With
this protocol (``python -m api`` runs it) a stream registers a callback
instead; under any other server it falls back to the watcher task
(:mod:`api.stream`).
"""

from __future__ import annotations

from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeraldHttpToolsProtocol(HttpToolsProtocol):
    """Calls ``on_lost`` (set by the stream being served, cleared when it ends) once the connection is gone."""

    on_lost: Callable[[], None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()
