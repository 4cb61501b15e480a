"""Shared fixtures: real node processes on free ports, and unique topic names."""

from __future__ import annotations

import contextlib
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


SERVING_PATHS: dict[str, dict[str, str]] = {
    "adapter": {},  # Herald's HTTP adapter on the locked uvicorn (api.adapter): what a node serves with
    "stock": {"HERALD_UVICORN_ADAPTER": "off"},  # stock uvicorn and the ASGI app: a node on an untested uvicorn
}
"""The two ways a node can serve HTTP. Tests marked ``http_contract`` run against a node of each."""


UNIT_MODULES = frozenset(
    {
        "test_auth_parts",
        "test_deps",
        "test_flusher",
        "test_hub",
        "test_lane",
        "test_loadtest_parts",
        "test_lock",
        "test_mercure_authorization",
        "test_mercure_space",
        "test_mercure_matchers",
        "test_protocol",
        "test_redis_keys",
        "test_sse",
        "test_sse_client",
        "test_subscribe",
        "test_upgrade_check",
    }
)
"""Modules of unit tests: in-process, no server started (``make check`` runs these)."""

BROWSER_MODULES = frozenset(
    {
        "test_browser_auth",
        "test_browser_resilience",
        "test_dashboard",
        "test_demo",
        "test_docs_offline",
        "test_front",
        "test_loadtest",
        "test_mercure_browser",
    }
)
"""Modules that drive Debian's headless Chromium (besides real processes)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "http_contract: the HTTP contract; its node and small_node serve both ways (SERVING_PATHS)"
    )
    config.addinivalue_line("markers", "unit: in-process, no server started; what `make check` runs")
    config.addinivalue_line("markers", "real: starts real processes (nodes, redis-server, nginx, prometheus)")
    config.addinivalue_line("markers", "browser: drives headless Chromium")
    config.addinivalue_line("markers", "bench: runs make bench's scenarios or the load tool's measurements")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test's kind, from its module (one module, one kind, but for the marks it gives)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if isinstance(item, pytest.Function) else ""
        if module in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
            continue
        item.add_marker(pytest.mark.real)
        if module in BROWSER_MODULES:
            item.add_marker(pytest.mark.browser)
        if module.startswith("test_bench"):
            item.add_marker(pytest.mark.bench)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("http_contract") is None:
        return
    for name in ("node", "small_node"):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, list(SERVING_PATHS), indirect=True, scope="session")


def serving_path(request: pytest.FixtureRequest) -> dict[str, str]:
    return SERVING_PATHS[getattr(request, "param", "adapter")]


@pytest.fixture(scope="session")
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """A node with default settings but a 1 s heartbeat, shared by the API tests."""
    with run_server({"HERALD_HEARTBEAT": "1", "HERALD_NODE_ID": "test-node", **serving_path(request)}) as node:
        yield node


@pytest.fixture(scope="session")
def small_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """A node with tiny limits, for the tests of every limit."""
    env = {
        **serving_path(request),
        "HERALD_REPLAY_SIZE": "5",
        "HERALD_MAX_EVENT_BYTES": "1000",
        "HERALD_MAX_TOPICS": "3",
        "HERALD_MAX_BODY_BYTES": "20000",
        "HERALD_RETRY_MS": "1234",
    }
    with run_server(env) as node:
        yield node


@pytest.fixture(scope="session")
def native_tools() -> None:
    """The load tool's compiled parts, built before any test times a run that uses them (a fresh checkout
    compiles them on first use, and that time would count against the run's own time limit)."""
    from workers.loadtest import native

    with contextlib.suppress(native.NativeUnavailable):  # a test that needs them fails with this message itself
        native.build()
        native.build_publisher()


@pytest.fixture
def topic() -> str:
    """A topic no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
