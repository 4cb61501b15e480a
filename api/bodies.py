"""Reading a request body under a byte limit, for the endpoints that parse their bodies themselves."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request


class BodyTooLarge(Exception):
    """The body (declared or received) is over the limit; each endpoint answers 413 in its own words."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is over the limit of {limit} bytes")
        self.limit = limit


class ClientGone(Exception):
    """The client went away before its request's body was all in: nothing was done, and no one to answer.

    A passing event, not an error: the app counts it and logs a line at most
    every few seconds (:func:`api.errors.client_gone`), where Starlette's own
    ``ClientDisconnect`` would have logged a traceback per request.
    """


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as its ``Content-Length`` or what has arrived exceeds ``limit``.

    Raises :class:`ClientGone` when the client disconnects before the end.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(limit)
    except ClientDisconnect:
        raise ClientGone from None
    return bytes(body)
