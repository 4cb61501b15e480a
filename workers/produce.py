"""Publish one event from the command line: straight to Redis (the Redis-level contract), or over HTTP.

``python -m workers.produce --topic orders --data '{"id": 42}' [--event created]``
publishes one event through :class:`broker.redis.RedisBroker` (the same
atomic script the API nodes use) and prints its id. Other languages publish
the same way by running ``broker/lua/publish.lua`` (see docs/producers.md).

Straight to Redis, no access token is involved: whoever can write to Herald's
Redis can publish anything, so Redis access *is* publish access (keep Redis
private). ``--token`` is refused there rather than silently ignored.

``--url http://host:port`` publishes the same event over HTTP instead
(``POST /publish``), through the node's access control: with ``--token``,
or with a token minted from ``HERALD_JWT_SECRET`` for that one topic when it
is set. The token is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from api.core.sse import encode_data
from api.models import PublishEvent
from api.token import mint_from_environment
from broker.base import Broker, Event, Message, RetentionPolicy
from broker.factory import partitions_setting, redis_broker, redis_target
from broker.redis import RedisBroker

HTTP_TIMEOUT = 10.0
MINTED_TTL = 300.0
"""Seconds a token minted for one ``--url`` publish is valid."""


def nodes_retention() -> RetentionPolicy:
    """The nodes' replay size and TTL as this environment says (HERALD_REPLAY_SIZE, HERALD_REPLAY_TTL).

    A producer writing to Redis must use the nodes' values: ``publish.lua`` trims each stream to the size it is
    given (plus one), so a smaller size than the nodes' makes their resumes ``reset`` earlier than they need to.
    """
    return RetentionPolicy(
        int(os.environ.get("HERALD_REPLAY_SIZE", "1000")), float(os.environ.get("HERALD_REPLAY_TTL", "3600"))
    )


async def publish_direct(
    redis_url: str,
    messages: Sequence[Message],
    *,
    idempotency_key: str | None = None,
    retention: RetentionPolicy | None = None,
    prefix: str = "herald",
) -> list[Event]:
    """Publish ``messages`` atomically through Redis; the events with their ids.

    ``retention`` must match the nodes' HERALD_REPLAY_SIZE and HERALD_REPLAY_TTL
    (the publisher trims the streams); by default, what :func:`nodes_retention` reads from the environment.
    """
    target = redis_target(redis_url, cluster_nodes=os.environ.get("REDIS_CLUSTER_NODES"))  # a cluster: detected
    partitions = partitions_setting()  # the nodes' HERALD_REDIS_PARTITIONS: where each topic lives
    broker: Broker
    if partitions > 1:
        broker = redis_broker(target, retention or nodes_retention(), partitions=partitions)
    else:
        broker = RedisBroker(target, retention or nodes_retention(), prefix=prefix)
    try:
        return await broker.publish(messages, idempotency_key)
    finally:
        await broker.close()


class PublishFailed(Exception):
    """The node did not publish the event: its status and what it said."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code} {detail}")
        self.status_code = status_code
        self.detail = detail


def publish_http(
    url: str,
    event: PublishEvent,
    *,
    token: str | None = None,
    idempotency_key: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """``POST /publish`` one event to the node at ``url``; its ``{"id", "topic"}``. Raises PublishFailed."""
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    body: dict[str, Any] = {"topic": event.topic, "data": event.data}  # data may be null: kept
    if event.event is not None:
        body["event"] = event.event
    with httpx.Client(timeout=HTTP_TIMEOUT, transport=transport) as client:
        response = client.post(f"{url.rstrip('/')}/publish", json=body, headers=headers)
    if response.status_code != 201:
        try:
            detail = str(response.json().get("detail"))
        except (ValueError, AttributeError):
            detail = response.text[:200] or response.reason_phrase
        raise PublishFailed(response.status_code, detail)
    published: dict[str, Any] = response.json()
    return published


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--url", help="publish over HTTP to this node (POST /publish, access control applies) instead of Redis"
    )
    parser.add_argument(
        "--token",
        help="with --url: the access token (default: minted from $HERALD_JWT_SECRET when set, else none)",
    )
    parser.add_argument("--topic", required=True)
    parser.add_argument("--data", required=True, help="JSON; a JSON string is sent as is")
    parser.add_argument("--event", help="SSE event type")
    parser.add_argument("--idempotency-key")
    defaults = nodes_retention()
    parser.add_argument("--replay-size", type=int, default=defaults.size)
    parser.add_argument("--replay-ttl", type=float, default=defaults.ttl)
    args = parser.parse_args(argv)
    if args.token is not None and args.url is None:
        parser.error(
            "--token needs --url: publishing straight to Redis checks no token (Redis access is publish access); "
            "to publish through the node's access control, give --url http://host:port"
        )
    try:
        event = PublishEvent(topic=args.topic, data=json.loads(args.data), event=args.event)
        data = encode_data(event.data)
    except ValueError as exc:  # also pydantic's ValidationError: the API's rules for names
        sys.exit(f"invalid event: {exc}")
    if args.url is not None:
        print(json.dumps(_publish_over_http(parser, args, event)))
        return
    retention = RetentionPolicy(args.replay_size, args.replay_ttl)
    events = asyncio.run(
        publish_direct(
            args.redis_url,
            [Message(event.topic, data, event.event)],
            idempotency_key=args.idempotency_key,
            retention=retention,
        )
    )
    for published in events:
        print(json.dumps({"id": str(published.id), "topic": published.topic}))


def _publish_over_http(parser: argparse.ArgumentParser, args: argparse.Namespace, event: PublishEvent) -> Any:
    token = args.token
    if token is None:
        try:
            token = mint_from_environment(publish=[event.topic], sub="produce", ttl=MINTED_TTL)
        except ValueError as exc:
            parser.error(f"cannot mint a token from HERALD_JWT_SECRET: {exc} (or pass --token)")
    try:
        return publish_http(args.url, event, token=token, idempotency_key=args.idempotency_key)
    except httpx.HTTPError as exc:
        sys.exit(f"publishing to {args.url} failed: {exc or type(exc).__name__}")
    except PublishFailed as exc:
        hint = ""
        if exc.status_code in (401, 403):
            hint = f" (access control is on: pass --token, or set HERALD_JWT_SECRET; it must allow {event.topic!r})"
        sys.exit(f"the node refused the event: {exc}{hint}")


if __name__ == "__main__":
    main()
