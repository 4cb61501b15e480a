"""The test harness's own clients: what they cost and how they fail must not depend on the machine's speed.

``test_regression_redis_restart_then_node_kill_left_clients_missing_events``
needs 300 clients connected within 30 s. Each client built its own
``httpx.AsyncClient`` (a CA-bundle load, 20-50 ms with the loop blocked), so
the set-up alone ate half the deadline on a slower machine, and a client
whose connect then timed out raised ``TimeoutError``, which its task did not
catch: it died, and the test waited for it until its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest

from tests import sse_client
from tests.sse_client import ResumingClient, new_client, shared_pool


def test_regression_clients_built_per_connection_ate_the_connect_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many clients the harness builds, it loads the CA bundle at most once."""
    made: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(context)
        return context

    monkeypatch.setattr(ssl, "create_default_context", counting)
    sse_client.tls_context.cache_clear()
    try:
        clients = [new_client() for _ in range(50)] + [shared_pool() for _ in range(5)]
        assert len(made) <= 1
    finally:
        sse_client.tls_context.cache_clear()
    for client in clients:
        asyncio.run(client.aclose())


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A TCP server on loopback that accepts connections and never answers them."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", held
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(30)
async def test_regression_a_client_whose_connect_timed_out_died_instead_of_retrying() -> None:
    async with silent_server() as (url, held), shared_pool() as pool:
        client = ResumingClient(url, ["t"], retry_delay=0.01, client=pool, open_timeout=0.2)
        task = asyncio.create_task(client.run())
        try:
            async with asyncio.timeout(20):
                while client.failed_attempts < 3:  # each attempt times out, and is tried again
                    assert not task.done(), task
                    await asyncio.sleep(0.05)  # polling the client's own progress on this loop
        finally:
            client.stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(held) >= 3  # every retry was a new connection, as EventSource's is
    assert not client.connected.is_set()
