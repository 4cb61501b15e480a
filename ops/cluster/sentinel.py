"""Asking Redis and its sentinels one quick question each (no retries: "is it up yet?" must not wait)."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ops.launch import SENTINEL_MASTER


def redis_client(port: int, decode_responses: bool = False) -> redis.Redis:
    """A client for one quick question to 127.0.0.1:``port``.

    No retries: redis-py retries a refused connection with backoff by
    default, which turns every "is it up yet?" into seconds of waiting.
    """
    return redis.Redis(
        port=port,
        socket_connect_timeout=0.5,
        socket_timeout=2,
        decode_responses=decode_responses,
        retry=Retry(NoBackoff(), 0),
    )


def sentinel_command(port: int, *args: str) -> object:
    """``SENTINEL <args>`` sent to the sentinel on ``port``, its reply as decoded strings."""
    client = redis_client(port, decode_responses=True)
    try:
        reply: object = client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]
        return reply
    finally:
        client.close()


def sentinel_master(port: int) -> dict[str, str]:
    """``SENTINEL MASTER herald`` as a dict of strings (a flat list of names and values on the wire)."""
    reply = sentinel_command(port, "MASTER", SENTINEL_MASTER)
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    assert isinstance(reply, list), reply
    items = [str(x) for x in reply]
    return dict(zip(items[::2], items[1::2], strict=True))
