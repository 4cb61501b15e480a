"""Publish straight to Redis, without HTTP: the producer side of the Redis-level contract.

``python -m workers.produce --topic orders --data '{"id": 42}' [--event created]``
publishes one event through :class:`broker.redis.RedisBroker` (the same
atomic script the API nodes use) and prints its id. Other languages publish
the same way by running ``broker/lua/publish.lua`` (see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from api.models import PublishEvent
from api.sse import encode_data
from broker.base import Event, Message, RetentionPolicy
from broker.redis import RedisBroker


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
    (the publisher trims the streams).
    """
    broker = RedisBroker(redis_url, retention, prefix=prefix)
    try:
        return await broker.publish(messages, idempotency_key)
    finally:
        await broker.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--topic", required=True)
    parser.add_argument("--data", required=True, help="JSON; a JSON string is sent as is")
    parser.add_argument("--event", help="SSE event type")
    parser.add_argument("--idempotency-key")
    parser.add_argument("--replay-size", type=int, default=int(os.environ.get("HERALD_REPLAY_SIZE", "1000")))
    parser.add_argument("--replay-ttl", type=float, default=float(os.environ.get("HERALD_REPLAY_TTL", "3600")))
    args = parser.parse_args(argv)
    try:
        event = PublishEvent(topic=args.topic, data=json.loads(args.data), event=args.event)
        data = encode_data(event.data)
    except ValueError as exc:  # also pydantic's ValidationError: the API's rules for names
        sys.exit(f"invalid event: {exc}")
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


if __name__ == "__main__":
    main()
