"""Shared fixtures: real node processes on free ports, and unique topic names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import redis_server
from tests.server import Node, run_server


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_redis() -> Iterator[None]:
    """Stop the session's shared redis-server (if a test started it) at the end."""
    yield
    redis_server.stop_shared()


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    """A node with default settings but a 1 s heartbeat, shared by the API tests."""
    with run_server({"HERALD_HEARTBEAT": "1", "HERALD_NODE_ID": "test-node"}) as node:
        yield node


@pytest.fixture(scope="session")
def small_node() -> Iterator[Node]:
    """A node with tiny limits, for the tests of every limit."""
    env = {
        "HERALD_REPLAY_SIZE": "5",
        "HERALD_MAX_EVENT_BYTES": "1000",
        "HERALD_MAX_TOPICS": "3",
        "HERALD_MAX_BODY_BYTES": "20000",
        "HERALD_RETRY_MS": "1234",
    }
    with run_server(env) as node:
        yield node


@pytest.fixture
def topic() -> str:
    """A topic no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
