"""The fan-out benchmark still runs end to end (a smoke run: it measures nothing here)."""

from __future__ import annotations

import pytest

from tests.server import Node
from workers.bench_fanout import run


@pytest.mark.timeout(60)
async def test_bench_delivers_every_event_to_every_subscriber(node: Node) -> None:
    result = await run(node.url, subscribers=20, sample=5, rate=200, seconds=0.2, flood=100, batch=10)
    assert result["all_delivered"] is True
    assert result["subscribers"] == 20
