"""The Python stack people would otherwise pick: sse-starlette + broadcaster on uvicorn.

A peer of ``make bench``, run from its own venv (see peer-requirements.txt),
never imported by Herald. ``POST /publish?topic=T`` publishes the raw body;
``GET /events?topic=T`` streams it (no ids, no resume: broadcaster has none).
Lines end in ``\\n`` (``sep``) so every system's stream parses the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from broadcaster import Broadcast
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

broadcast = Broadcast(os.environ.get("BROADCAST_URL", "memory://"))


async def publish(request: Request) -> Response:
    await broadcast.publish(channel=request.query_params["topic"], message=(await request.body()).decode())
    return Response(status_code=201)


async def events(request: Request) -> Response:
    topic = request.query_params["topic"]

    async def stream() -> AsyncIterator[dict[str, str]]:
        async with broadcast.subscribe(channel=topic) as subscriber:
            async for event in subscriber:
                yield {"data": event.message}

    response: Response = EventSourceResponse(stream(), sep="\n", ping=15)
    return response


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    yield
    await broadcast.disconnect()


app = Starlette(
    routes=[
        Route("/publish", publish, methods=["POST"]),
        Route("/events", events),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
