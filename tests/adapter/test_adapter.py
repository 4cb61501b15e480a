"""The gate in front of Herald's HTTP adapter: used with a tested uvicorn only, stock uvicorn otherwise.

The whole HTTP contract runs on both paths (tests marked ``http_contract``,
see ``conftest.SERVING_PATHS``); here, the choice itself, what a node on an
untested uvicorn does and says, and that the lock and the ranges agree with it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from api import adapter
from ops.launch import ROOT
from tests.server import run_server
from tests.sse_client import EventStream, publish

UNTESTED = "0.99.0"
PRETEND_UNTESTED = [
    sys.executable,
    "-c",
    f"import uvicorn; uvicorn.__version__ = {UNTESTED!r}; from api.__main__ import main; main()",
]
"""A node as ``python -m api`` starts it, with uvicorn saying it is a release the adapter was not tested with."""


def locked_version(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = [package["version"] for package in lock["package"] if package["name"] == name]
    assert len(versions) == 1, versions
    return str(versions[0])


def project_requirement(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("mode", "version", "uses_adapter", "warns"),
    [
        ("auto", adapter.TESTED_UVICORN[0], True, False),
        ("auto", UNTESTED, False, True),
        ("on", UNTESTED, True, True),
        ("on", adapter.TESTED_UVICORN[0], True, False),
        ("off", adapter.TESTED_UVICORN[0], False, True),
    ],
)
def test_the_adapter_serves_only_a_tested_uvicorn_unless_told(
    mode: adapter.Mode, version: str, uses_adapter: bool, warns: bool
) -> None:
    choice = adapter.choose(mode, version)
    assert choice.adapter is uses_adapter
    assert (choice.hooks is adapter.STOCK) is not uses_adapter
    assert (choice.warning() is not None) is warns


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, on, off"):
        adapter.choose("sometimes", adapter.TESTED_UVICORN[0])  # type: ignore[arg-type]


def test_the_lock_pins_a_uvicorn_the_adapter_was_tested_with() -> None:
    assert locked_version("uvicorn") in adapter.TESTED_UVICORN


def test_pyproject_caps_uvicorn_below_its_next_minor_release() -> None:
    locked = Version(locked_version("uvicorn"))
    allowed = project_requirement("uvicorn").specifier
    assert allowed.contains(locked)
    assert not allowed.contains(f"{locked.major}.{locked.minor + 1}.0")


def test_stock_hooks_touch_nothing_of_the_server() -> None:
    stock = adapter.STOCK
    assert stock.http == "httptools"
    assert stock.direct_writes(object(), object()) is False  # type: ignore[arg-type]
    assert stock.aborter(object()) is None  # type: ignore[arg-type]
    assert stock.disconnect_notifier(object(), lambda: None) is None  # type: ignore[arg-type]


def test_an_untested_uvicorn_never_imports_the_adapters_internals() -> None:
    """On a uvicorn it does not know, the node must not even import the code that drives its internals."""
    probe = (
        f"import sys, uvicorn; uvicorn.__version__ = {UNTESTED!r}\n"
        "from api.app import create_app\n"
        "app = create_app()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('api.adapter.'))\n"
        "print(app.state.server.adapter, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False []"


@pytest.mark.timeout(60)
async def test_a_node_on_an_untested_uvicorn_warns_once_and_serves_the_contract_through_stock_uvicorn() -> None:
    with run_server({"HERALD_NODE_ID": "untested"}, command=PRETEND_UNTESTED) as node:
        async with httpx.AsyncClient(timeout=10) as client:
            stats = (await client.get(f"{node.url}/stats")).json()
            topic = "untested-uvicorn"
            async with await EventStream.open(node.url, [topic]) as stream:
                assert stream.response.status_code == 200
                assert stream.response.headers["content-type"] == "text/event-stream"
                first = (await publish(node.url, {"topic": topic, "data": "a"}, client)).json()["id"]
                assert (await stream.next_event()).last_event_id == first
            second = (await publish(node.url, {"topic": topic, "data": "b"}, client)).json()["id"]
            async with await EventStream.open(node.url, [topic], last_event_id=first) as stream:
                resumed = await stream.next_event()
            assert (resumed.last_event_id, resumed.data) == (second, "b")
            stats_after = (await client.get(f"{node.url}/stats")).json()
        log = node.log()
    assert stats["server"] == {"http": adapter.STOCK.name, "adapter": False, "uvicorn": UNTESTED}
    assert stats_after["hub"]["direct_writes"] == 0  # nothing written past ASGI's send
    warnings = [line for line in log.splitlines() if "is not a version Herald's HTTP adapter was tested with" in line]
    assert len(warnings) == 1, log
    assert UNTESTED in warnings[0]
    assert "Traceback" not in log


@pytest.mark.timeout(60)
async def test_a_node_on_the_locked_uvicorn_serves_with_the_adapter_and_says_nothing_of_it() -> None:
    with run_server({"HERALD_NODE_ID": "tested"}) as node:
        async with httpx.AsyncClient(timeout=10) as client:
            stats = (await client.get(f"{node.url}/stats")).json()
        log = node.log()
    assert stats["server"]["adapter"] is True
    assert stats["server"]["uvicorn"] in adapter.TESTED_UVICORN
    assert "HTTP adapter" not in log
