"""The tools against a node with access control on: the load tool, the demo producer and ``workers.produce``.

A real node with ``HERALD_JWT_SECRET`` set; each tool run as its own
process (or its ``main``) as an operator would: with ``--token``, with a
token minted from ``HERALD_JWT_SECRET``, and with none (refused, and said
so). A token is never printed nor written to a result.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.token import mint
from ops.launch import ROOT
from tests.server import Node, run_server
from tests.sse_client import EventStream
from workers import demo

SECRET = secrets.token_urlsafe(48)
JWT_PREFIX = "eyJ"
"""How every JWT starts (the base64 of ``{"``): none may appear in what a tool prints or writes."""
RUN_TIMEOUT = 90


@pytest.fixture(scope="module")
def auth_node() -> Iterator[Node]:
    with run_server({"HERALD_JWT_SECRET": SECRET, "HERALD_NODE_ID": "auth-node"}) as node:
        yield node


def token(**rights: Any) -> str:
    return mint(SECRET, **rights)


def tool_env(secret: str | None) -> dict[str, str]:
    """This environment without any HERALD_ variable, plus ``secret`` as HERALD_JWT_SECRET when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    if secret is not None:
        env["HERALD_JWT_SECRET"] = secret
    return env


def run_loadtest(node: Node, out: Path, *args: str, secret: str | None = None) -> tuple[int, dict[str, Any], str]:
    """The load tool to its end: exit status, JSON result, and everything it printed (both streams)."""
    command = [sys.executable, "-m", "workers.loadtest", "--target", node.url, "--subscribers", "20", "--rate",
               "100", "--duration", "1", "--ramp", "0.2", "--drain", "5", "--json", str(out), *args]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=tool_env(secret), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.exists(), f"no result written:\n{done.stdout}\n{done.stderr}"
    return done.returncode, json.loads(out.read_text()), done.stdout + done.stderr


# -- the load tool -------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("client", "publisher"), [("python", "python"), ("native", "native")])
def test_the_load_tool_mints_a_token_from_the_secret_and_every_event_arrives(
    auth_node: Node, tmp_path: Path, client: str, publisher: str
) -> None:
    code, result, printed = run_loadtest(
        auth_node, tmp_path / "r.json", "--client", client, "--publisher", publisher, secret=SECRET
    )
    assert code == 0, printed
    assert result["verdict"] == {"pass": True, "reasons": []}
    assert result["publish"]["accepted"] == 100
    assert result["delivery"]["delivered"] == result["delivery"]["expected"] == 20 * 100
    assert result["connections"]["errors"] == {}
    assert result["config"]["auth"] == "minted"
    assert "token" not in result["config"]
    assert "minted from HERALD_JWT_SECRET" in printed
    assert JWT_PREFIX not in printed
    assert JWT_PREFIX not in (tmp_path / "r.json").read_text()


@pytest.mark.timeout(120)
def test_the_load_tool_sends_the_token_given_and_never_shows_it(auth_node: Node, tmp_path: Path) -> None:
    given = token(publish=["lt-*"], subscribe=["lt-*"])
    report = tmp_path / "report.html"
    code, result, printed = run_loadtest(
        auth_node, tmp_path / "r.json", "--token", given, "--client", "native", "--report", str(report)
    )
    assert code == 0, printed
    assert result["delivery"]["lost"] == 0
    assert result["config"]["auth"] == "given"
    for text in (printed, (tmp_path / "r.json").read_text(), report.read_text()):
        assert given not in text
        assert given.split(".")[2] not in text  # not even its signature


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["python", "native"])
def test_without_a_token_the_load_tool_reports_every_refusal_by_cause(
    auth_node: Node, tmp_path: Path, client: str
) -> None:
    code, result, _ = run_loadtest(
        auth_node, tmp_path / "r.json", "--client", client, "--connect-timeout", "2", "--retry-for", "0"
    )
    assert code == 1
    assert result["config"]["auth"] == "none"
    assert result["publish"]["accepted"] == 0
    assert set(result["publish"]["errors"]) == {"401"}
    assert result["connections"]["connected"] == 0
    assert set(result["connections"]["errors"]) == {"401 this needs a token"}
    assert "no event was accepted" in result["verdict"]["reasons"]


@pytest.mark.timeout(120)
def test_a_token_for_other_topics_is_refused_with_403(auth_node: Node, tmp_path: Path) -> None:
    other = token(publish=["orders/*"], subscribe=["orders/*"])
    code, result, _ = run_loadtest(auth_node, tmp_path / "r.json", "--token", other, "--connect-timeout", "2")
    assert code == 1
    assert set(result["publish"]["errors"]) == {"403"}
    assert result["publish"]["refused"] == 100  # a 403 is not retried: refused, never counted as lost
    assert all(
        cause.startswith("403 the token does not allow subscribing") for cause in result["connections"]["errors"]
    )


# -- the demo producer ------------------------------------------------------------------


async def _ticks_reach_a_subscriber(node: Node, topic: str, argv: list[str]) -> int:
    """Run the demo's main (in a thread) on ``topic``; the ticks a token-carrying subscriber got."""
    headers = {"Authorization": f"Bearer {token(subscribe=[topic])}"}
    async with await EventStream.open(node.url, [topic], headers=headers) as stream:
        assert stream.response.status_code == 200
        argv = [*argv, "--url", node.url, "--ticker-topic", topic, "--chat-topic", f"{topic}-chat",
                "--tick-interval", "0.05", "--duration", "0.6"]  # fmt: skip
        code = await asyncio.wait_for(asyncio.to_thread(demo.main, argv), 30)
        assert code == 0
        ticks = [await stream.next_event(timeout=10) for _ in range(3)]
    assert all(e.type == "tick" for e in ticks)
    return len(ticks)


@pytest.mark.timeout(60)
async def test_the_demo_publishes_with_the_token_given(auth_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERALD_JWT_SECRET", raising=False)
    given = token(publish=["demo-given", "demo-given-chat"])
    assert await _ticks_reach_a_subscriber(auth_node, "demo-given", ["--token", given]) == 3


@pytest.mark.timeout(60)
async def test_the_demo_mints_its_token_from_the_secret(auth_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_JWT_SECRET", SECRET)
    assert await _ticks_reach_a_subscriber(auth_node, "demo-minted", []) == 3


@pytest.mark.timeout(60)
def test_the_demo_without_a_token_stops_and_says_why(
    auth_node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("HERALD_JWT_SECRET", raising=False)
    assert demo.main(["--url", auth_node.url, "--duration", "10"]) == 1
    assert "publish refused with 401" in caplog.text
    assert "pass --token" in caplog.text


def test_the_demo_refuses_a_secret_it_cannot_sign_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_JWT_SECRET", "short")
    assert demo.main(["--url", "http://127.0.0.1:1", "--duration", "1"]) == 2


def test_minted_demo_tokens_are_renewed_halfway_through_their_life() -> None:
    now = [0.0]
    minted: list[int] = []

    def minter() -> str:
        minted.append(1)
        return f"token-{len(minted)}"

    source = demo.TokenSource(minter=minter, ttl=100, clock=lambda: now[0])
    assert source.current() == "token-1"
    now[0] = 49.9
    assert source.current() == "token-1"
    now[0] = 50.0
    assert source.current() == "token-2"
    assert demo.TokenSource("fixed").current() == "fixed"
    assert demo.TokenSource().current() is None


# -- workers.produce ----------------------------------------------------------------------


def produce(*args: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.produce", *args],
        cwd=ROOT, env=tool_env(secret), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.timeout(60)
async def test_produce_over_http_with_a_token_given_or_minted(auth_node: Node) -> None:
    topic = "produced"
    headers = {"Authorization": f"Bearer {token(subscribe=[topic])}"}
    given = token(publish=[topic])
    async with await EventStream.open(auth_node.url, [topic], headers=headers) as stream:
        first = await asyncio.to_thread(
            produce, "--url", auth_node.url, "--token", given, "--topic", topic, "--data", '{"n": 1}'
        )
        assert first.returncode == 0, first.stderr
        second = await asyncio.to_thread(
            produce, "--url", auth_node.url, "--topic", topic, "--data", "null", "--event", "ping", secret=SECRET
        )
        assert second.returncode == 0, second.stderr
        events = await stream.take(2)
    assert [(e.data, e.type) for e in events] == [('{"n":1}', "message"), ("null", "ping")]
    assert [json.loads(p.stdout)["id"] for p in (first, second)] == [e.last_event_id for e in events]
    assert given not in first.stdout + first.stderr


@pytest.mark.timeout(60)
def test_produce_over_http_without_a_token_is_refused_with_a_hint(auth_node: Node) -> None:
    done = produce("--url", auth_node.url, "--topic", "produced", "--data", "1")
    assert done.returncode == 1
    assert "401" in done.stderr
    assert "pass --token" in done.stderr


def test_produce_refuses_a_token_for_redis_which_checks_none() -> None:
    done = produce("--token", token(publish=["x"]), "--topic", "x", "--data", "1")
    assert done.returncode == 2
    assert "--token needs --url" in done.stderr
    assert "Redis access is publish access" in done.stderr
