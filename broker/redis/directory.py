"""The node directory and node entries in Redis: which nodes are up (``/cluster``), and what each node keeps.

* ``<prefix>:node:<id>``: the node's record, expiring after its TTL (the node is alive while it is there);
* ``<prefix>:nodes``: a hash of every node's last record and when it was written, so a node gone quiet is
  still listed, as gone, for a while;
* ``<prefix>:entries:<kind>:<id>``: a node's entries of one kind (the Mercure hub's active subscriptions),
  expiring some time after their last change, taken by a survivor when the node is gone.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from broker.base import NodeRecord
from broker.redis.connection import Commands


class Directory:
    """:class:`~broker.base.NodeDirectory` and :class:`~broker.base.NodeEntries` on Redis."""

    def __init__(self, commands: Commands) -> None:
        self._commands = commands

    # -- NodeDirectory ----------------------------------------------------------

    async def announce(self, node_id: str, record: str, ttl: float) -> None:
        """``<prefix>:node:<id>`` (the record, expiring after ``ttl``) says the node is alive; the hash
        ``<prefix>:nodes`` keeps every node's last record (and when it was written) so a node gone
        quiet is still listed, as gone, for a while."""
        now = time.time()
        pipe = self._commands.redis.pipeline(transaction=False)
        pipe.set(f"{self._commands.prefix}:node:{node_id}", record, px=max(1, int(ttl * 1000)))
        pipe.hset(f"{self._commands.prefix}:nodes", node_id, f"{now}|{record}")
        await self._commands.call(pipe.execute)

    async def nodes(self, forget: float) -> list[NodeRecord]:
        entries: dict[str | bytes, str | bytes] = await self._commands.call(
            lambda: self._commands.redis.hgetall(f"{self._commands.prefix}:nodes")
        )
        now = time.time()
        known: list[tuple[str, str]] = []
        stale: list[str] = []
        for raw_id, raw in entries.items():
            node_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            seen, _, record = (raw.decode() if isinstance(raw, bytes) else raw).partition("|")
            try:
                fresh = now - float(seen) <= forget
            except ValueError:
                fresh = False
            if fresh:
                known.append((node_id, record))
            else:
                stale.append(node_id)
        if stale:
            await self._commands.call(lambda: self._commands.redis.hdel(f"{self._commands.prefix}:nodes", *stale))
        if not known:
            return []
        keys = [f"{self._commands.prefix}:node:{node_id}" for node_id, _ in known]
        flags = await self._commands.call(lambda: self._alive(keys))
        return [NodeRecord(n, r, bool(a)) for (n, r), a in zip(known, flags, strict=True)]

    async def _alive(self, keys: list[str]) -> list[bool]:
        pipe = self._commands.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in await pipe.execute()]

    # -- NodeEntries -------------------------------------------------------------

    def _entries_key(self, kind: str, node_id: str) -> str:
        return f"{self._commands.prefix}:entries:{kind}:{node_id}"

    async def put_entries(self, node_id: str, kind: str, entries: Mapping[str, str], keep: float) -> None:
        """``<prefix>:entries:<kind>:<node id>``: a hash, expiring ``keep`` seconds after its last change."""
        key = self._entries_key(kind, node_id)

        async def run() -> None:
            pipe = self._commands.redis.pipeline(transaction=False)
            if entries:
                pipe.hset(key, mapping=dict[Any, Any](entries))
            pipe.pexpire(key, max(1, int(keep * 1000)))
            await pipe.execute()

        await self._commands.call(run)

    async def drop_entries(self, node_id: str, kind: str, keys: Collection[str], keep: float) -> None:
        key = self._entries_key(kind, node_id)

        async def run() -> None:
            pipe = self._commands.redis.pipeline(transaction=False)
            if keys:
                pipe.hdel(key, *keys)
            pipe.pexpire(key, max(1, int(keep * 1000)))
            await pipe.execute()

        await self._commands.call(run)

    async def entries(self, kind: str, node_ids: Collection[str]) -> dict[str, dict[str, str]]:
        ids = list(node_ids)
        if not ids:
            return {}

        async def run() -> list[dict[Any, Any]]:
            pipe = self._commands.redis.pipeline(transaction=False)
            for node_id in ids:
                pipe.hgetall(self._entries_key(kind, node_id))
            return list(await pipe.execute())

        found = await self._commands.call(run)
        return {node_id: _text_map(raw) for node_id, raw in zip(ids, found, strict=True) if raw}

    async def take_entries(self, node_id: str, kind: str) -> dict[str, str]:
        """HGETALL and DEL in one MULTI: of several takers, one gets the entries, the others nothing."""
        key = self._entries_key(kind, node_id)

        async def run() -> dict[Any, Any]:
            pipe = self._commands.redis.pipeline(transaction=True)
            pipe.hgetall(key)
            pipe.delete(key)
            raw, _ = await pipe.execute()
            return dict(raw)

        return _text_map(await self._commands.call(run, idempotent=False))


def _text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A hash as Redis answered it (bytes or str, by the client's decoding), as text."""
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in raw.items()
    }
