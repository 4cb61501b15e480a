"""Error responses: every refusal is a JSON body that says what is wrong."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.auth.access import Denied
from api.node.logs import ThrottledLog

RETRY_AFTER_SECONDS = 2


class RequestRejected(Exception):
    """A client error with its status code and a message for the client."""

    def __init__(self, status_code: int, detail: object) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


async def request_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestRejected)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def denied_response(exc: Denied) -> JSONResponse:
    """401/403 with the RFC 6750 challenge; the body says what is missing (never echoes the token)."""
    return JSONResponse(
        {"detail": exc.detail}, status_code=exc.status_code, headers={"WWW-Authenticate": exc.challenge}
    )


async def denied(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Denied)
    return denied_response(exc)


async def keys_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": f"tokens can't be verified now: {exc}"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": f"broker unavailable: {exc}"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


CLIENTS_GONE = ThrottledLog(
    logging.getLogger("herald.node"), "clients disconnected before their request's body was in; nothing was done"
)
"""Every client that went away mid-request on this node (``herald_client_disconnects_total``)."""


async def client_gone(request: Request, exc: Exception) -> Response:
    """A client gone before its body was in: counted, logged at most every few seconds, answered to no one."""
    CLIENTS_GONE.note()
    return Response(status_code=400)  # uvicorn drops it: the connection is gone
