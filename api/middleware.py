"""ASGI middleware. Pure ASGI (not BaseHTTPMiddleware), so streams pass through untouched."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class NodeIdMiddleware:
    """Adds ``X-Node-Id`` to every HTTP response, errors included."""

    def __init__(self, app: ASGIApp, node_id: str) -> None:
        self.app = app
        self.header = (b"x-node-id", node_id.encode("ascii"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_node_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_node_id)
