"""Publishing: the ``publish.lua`` script, and ``WAIT`` for replicas when asked.

The script takes the ids, appends to each topic's stream (trimmed
approximately, keeping at least size + 1 entries: the replay window and its
floor are the reader's, ``history.lua``), checks the idempotency key and
PUBLISHes to each topic's channel, in one atomic step: ids are issued in the
order messages are published, across every topic and every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from broker.base import BrokerUnavailable, Event, IdempotencyConflict, Message, RetentionPolicy
from broker.redis.connection import PUBLISH_SCRIPT, Commands

ACK_TIMEOUT_MS = 2000
"""How long a publish waits for ``replicas_ack`` replicas (``WAIT``), in milliseconds."""


class Publisher:
    """Publishes batches; with ``replicas_ack``, a publish returns only once that many replicas have it."""

    def __init__(self, commands: Commands, retention: RetentionPolicy, replicas_ack: int) -> None:
        self._commands = commands
        self._retention = retention
        self._replicas_ack = replicas_ack
        self.last_published = 0
        """The largest id this process published: a primary behind it after a failover lost events (the feed)."""

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        commands = self._commands
        commands.check_open()
        args: list[str | int] = [
            commands.prefix,
            commands.now(),
            self._retention.size,
            int(self._retention.ttl * 1_000_000),
            idempotency_key or "",
            len(messages),
        ]
        for message in messages:
            args += [message.topic, message.type or "", message.data]
        keys = commands.publish_keys((m.topic for m in messages), idempotency_key)
        if self._replicas_ack:
            _, joined = await commands.call(lambda: self._publish_and_wait(keys, args), idempotent=False)
        else:
            _, joined = await commands.call(lambda: commands.publish_script(keys=keys, args=args), idempotent=False)
        ids = [int(i) for i in str(joined).split(",")]
        if len(ids) != len(messages):
            raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used for a different request")
        self.last_published = max(self.last_published, ids[-1])
        return [Event(i, m.topic, m.data, m.type) for i, m in zip(ids, messages, strict=True)]

    async def _publish_and_wait(self, keys: list[str], args: list[str | int]) -> Any:
        # WAIT counts the replicas that have everything this connection wrote,
        # so it must follow the script on the same connection: one pipeline.
        commands = self._commands
        if isinstance(commands.redis, RedisCluster):
            try:
                return await self._pipeline_and_wait(keys, args)
            except ResponseError as exc:
                if "NOSCRIPT" not in str(exc) and "No matching script" not in str(exc):
                    raise
            # redis-py loads a pipeline's scripts on one Redis, not on a cluster: a new primary (scripts are not
            # replicated) or a fresh cluster refuses the EVALSHA, which therefore did not run. Load, send again.
            owner = commands.redis.get_node_from_key(commands.keys[0])
            await commands.redis.execute_command("SCRIPT", "LOAD", PUBLISH_SCRIPT, target_nodes=owner)
        return await self._pipeline_and_wait(keys, args)

    async def _pipeline_and_wait(self, keys: list[str], args: list[str | int]) -> Any:
        commands = self._commands
        async with commands.redis.pipeline(transaction=False) as pipe:
            await commands.publish_script(keys=keys, args=args, client=pipe)
            if isinstance(commands.redis, RedisCluster):
                # A keyless command could go to any primary: name the one that owns Herald's slot.
                owner = commands.redis.get_node_from_key(commands.keys[0])
                pipe.execute_command("WAIT", self._replicas_ack, ACK_TIMEOUT_MS, target_nodes=owner)
            else:
                pipe.wait(self._replicas_ack, ACK_TIMEOUT_MS)
            result, acked = await pipe.execute()
        if int(acked) < self._replicas_ack:
            # Published on the primary (subscribers may have it), but a
            # failover now could lose it: not accepted. A retry with the same
            # Idempotency-Key waits for the replicas again, publishing nothing twice.
            raise BrokerUnavailable(f"only {acked} of {self._replicas_ack} replicas acknowledged the publish in time")
        return result
