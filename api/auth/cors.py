"""CORS for the browser-facing routes: ``HERALD_CORS_ORIGINS`` may read streams and publish from a page.

Only the listed origins (exact ``scheme://host[:port]``) get
``Access-Control-Allow-Origin`` (their own origin, never ``*``) and
``Access-Control-Allow-Credentials: true``, so a page of theirs may use
``EventSource(url, {withCredentials: true})`` with the node's cookie, or
``fetch`` with an ``Authorization`` header after a preflight. Any other
origin gets no CORS header and its browser keeps the answer from the page.

The same headers are produced by :meth:`Cors.headers` for the ``/events``
ASGI shortcut (which runs ahead of the middleware stack) and by
:class:`CorsMiddleware` for everything else, including preflights.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CORS_PATHS = frozenset({"/events", "/publish"})
"""The routes a page of another origin may use (the API a browser talks to)."""

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"Authorization, Content-Type, Last-Event-ID, Idempotency-Key"
EXPOSE_HEADERS = b"X-Node-Id"
PREFLIGHT_MAX_AGE = b"600"

Header = tuple[bytes, bytes]


class Cors:
    """The allowed origins, and the headers an answer to each request gets."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = frozenset(o.rstrip("/").encode("latin-1") for o in origins)

    @classmethod
    def parse(cls, text: str | None) -> Cors:
        return cls(tuple(item.strip() for item in (text or "").split(",") if item.strip()))

    def __bool__(self) -> bool:
        return bool(self.origins)

    def headers(self, request_headers: list[Header]) -> list[Header]:
        """Headers for the answer to a (non-preflight) request with these headers."""
        if not self.origins:
            return []
        origin = _origin(request_headers)
        if origin is None or origin not in self.origins:
            return [(b"vary", b"Origin")]
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-expose-headers", EXPOSE_HEADERS),
            (b"vary", b"Origin"),
        ]

    def trusts_ambient_credentials(self, request_headers: list[Header]) -> bool:
        """May this request's cookie stand for the user? Not when it comes from a page of an unlisted origin.

        A browser sends the cookie with a cross-origin GET whatever CORS says;
        CORS only keeps the answer from the page. Ignoring the cookie then
        means the node opens no stream for a page that may not read it. A
        request without ``Origin`` (same-origin GET, non-browser clients) or
        from the node's own origin is trusted.
        """
        origin = _origin(request_headers)
        if origin is None or origin in self.origins:
            return True
        host = next((value for name, value in request_headers if name == b"host"), None)
        return host is not None and origin.partition(b"://")[2] == host

    def preflight(self, request_headers: list[Header]) -> tuple[int, list[Header]]:
        """Status and headers of the answer to a preflight (``OPTIONS`` with ``Access-Control-Request-Method``)."""
        origin = _origin(request_headers)
        if origin is None or origin not in self.origins:
            return 403, [(b"vary", b"Origin")]
        return 204, [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ALLOW_HEADERS),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
            (b"vary", b"Origin"),
        ]


def _origin(headers: list[Header]) -> bytes | None:
    for name, value in headers:
        if name == b"origin":
            return value
    return None


class CorsMiddleware:
    """Pure ASGI: answers preflights for :data:`CORS_PATHS` and adds the CORS headers to their answers."""

    def __init__(self, app: ASGIApp, cors: Cors) -> None:
        self.app = app
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.cors or scope["path"] not in CORS_PATHS:
            await self.app(scope, receive, send)
            return
        headers: list[Header] = scope["headers"]
        if scope["method"] == "OPTIONS" and any(n == b"access-control-request-method" for n, _ in headers):
            status, extra = self.cors.preflight(headers)
            await send({"type": "http.response.start", "status": status, "headers": extra})
            await send({"type": "http.response.body", "body": b""})
            return
        extra = self.cors.headers(headers)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_cors)
