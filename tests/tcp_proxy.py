"""A TCP proxy on loopback that a test can tell to lose what passes through it.

Some faults can't be made by stopping a process: an answer lost after the
command ran, or a replica that stops receiving its primary's writes while
everything else goes on. The proxy sits between the two ends and, when told,
drops the client's connection right after forwarding a command (its answer
never arrives), holds back everything the server sends from then on, or
freezes: a network blackhole, where nothing passes either way and nothing is
closed, until it thaws and what was held passes on (as TCP's retransmissions
would deliver it).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``, both ways, until told otherwise."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._drop_after: bytes | None = None
        self._holding = False
        self._flowing = asyncio.Event()  # cleared while frozen
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def drop_answer_to(self, command: bytes) -> None:
        """The next time a client sends ``command``, forward it, then drop that client's connection unanswered."""
        self._drop_after = command.upper()

    def hold_back(self) -> None:
        """From now on nothing the server sends reaches any client (the connections stay open)."""
        self._holding = True

    def freeze(self) -> None:
        """From now on nothing passes either way, and no connection is closed (a blackhole), until :meth:`thaw`."""
        self._flowing.clear()

    def thaw(self) -> None:
        """End :meth:`freeze`: what was held passes on, in order, and so does everything after it."""
        self._flowing.set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._flowing.wait()  # a connect into a blackhole gets no further
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            self._connections.discard(task)
            return
        dropped = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self._drop_after is not None and self._drop_after in data.upper():
                    self._drop_after = None
                    dropped.set()  # from here on, nothing reaches this client
                    server_w.write(data)
                    await server_w.drain()
                    await asyncio.sleep(0.2)  # let the server run it
                    client_w.transport.abort()
                    return
                await self._flowing.wait()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if dropped.is_set() or client_w.is_closing():
                    return
                if self._holding:
                    continue  # read and kept from the client: as if the link stalled
                await self._flowing.wait()
                client_w.write(data)
                await client_w.drain()
            client_w.transport.abort()  # the server went away: so does the client's connection

        try:
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.gather(upstream(), downstream())
        finally:
            server_w.close()
            client_w.close()
            self._connections.discard(task)
