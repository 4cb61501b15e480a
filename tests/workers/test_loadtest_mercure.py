"""The load tool on Herald's Mercure hub (``--protocol mercure``), against real nodes on both brokers.

Each run is ``python -m workers.loadtest`` as its own process, as an operator
runs it, minting its Mercure token from the nodes' ``HERALD_JWT_SECRET`` and
``HERALD_MERCURE_AUDIENCE``; the accounting is the native API's (every
accepted update delivered exactly once, in order). On Redis the run goes
through two nodes: subscribers on both, the publisher alternating between
them. A resume the hub cannot make exact (``Mercure-Last-Event-ID:
earliest``) is counted as a reset, on a real stream. Bad option combinations
exit with status 2 before anything connects.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import jwt
import pytest

from tests import redis_server
from tests.server import Node, run_server
from workers.bench.client import NativeClient
from workers.loadtest import native
from workers.loadtest.config import ROOT, from_args, subscribe_path
from workers.loadtest.results import SCHEMA_PATH
from workers.loadtest.subscriber import Recorder, StreamProtocol, Subscriber
from workers.loadtest.wire import get_request, payload

SECRET = secrets.token_urlsafe(48)
AUDIENCE = "https://hub.test/.well-known/mercure"
HUB = "/.well-known/mercure"
NEEDS_REDIS = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")


def node_env(**extra: str) -> dict[str, str]:
    return {"HERALD_JWT_SECRET": SECRET, "HERALD_MERCURE_AUDIENCE": AUDIENCE, **extra}


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """One node on the embedded broker, its Mercure hub on."""
    with run_server(node_env()) as running:
        yield running


@pytest.fixture(scope="module")
def redis_nodes() -> Iterator[tuple[Node, Node]]:
    """Two nodes on one redis-server (a database of their own): one hub."""
    url = redis_server.shared_server().url.rsplit("/", 1)[0] + "/5"
    env = node_env(REDIS_URL=url)
    with run_server(env) as a, run_server(env) as b:
        yield a, b


def run_tool(out: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[int, str]:
    """The tool run to its end with the nodes' secret and audience in its environment: status, output.

    The nodes' own counts (their /metrics, read with the admin token the tool mints) are compared
    with the tool's, as for native runs.
    """
    command = [sys.executable, "-m", "workers.loadtest", "--quiet", "--protocol", "mercure", "--ramp", "0.3",
               "--drain", "10", "--json", str(out), *args]  # fmt: skip
    environ = {**os.environ, **node_env(), **(env or {})}
    done = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def read(out: Path, printed: str) -> dict[str, Any]:
    assert out.exists(), f"no result written:\n{printed}"
    result: dict[str, Any] = json.loads(out.read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(result)
    return result


def assert_exact(result: dict[str, Any], asked: int, per_subscriber: int, subscribers: int) -> None:
    """Every accepted update delivered once to every subscriber it was for, and the nodes agree.

    ``asked`` updates were asked for, ``per_subscriber`` of them for each subscriber. A loaded machine
    may publish fewer (a pacer far behind at time-up sends one last batch and stops, by design): then
    what was accepted is the measure.
    """
    delivery = result["delivery"]
    assert result["verdict"] == {"pass": True, "reasons": []}
    accepted = result["publish"]["accepted"]
    assert 0 < accepted <= asked
    assert result["publish"]["errors"] == {}
    if accepted == asked:
        assert delivery["expected"] == per_subscriber * subscribers
    assert delivery["delivered"] == delivery["expected"]
    server = result["server"]
    assert server["available"], server["why"]
    assert server["mode"] == "exact", server["note"]
    assert server["mismatches"] == []
    assert (delivery["lost"], delivery["duplicated"], delivery["out_of_order"], delivery["unexpected_topic"]) == (
        0,
        0,
        0,
        0,
    )
    assert result["connections"]["connected"] == subscribers
    assert result["connections"]["resets"] == {}
    assert result["latency_ms"]["count"] == delivery["delivered"]
    assert result["config"]["protocol"] == "mercure"
    assert result["config"]["auth"] == "minted"
    assert "token" not in json.dumps(result["config"]).replace("metrics_token", "")


@pytest.mark.timeout(90)
def test_a_mercure_run_delivers_every_accepted_update_exactly_once(node: Node, tmp_path: Path) -> None:
    # 60 subscribers, each on 2 of 3 topics (two match= on one stream): 2/3 of the updates each.
    out = tmp_path / "result.json"
    code, printed = run_tool(
        out, "--target", node.url, "--subscribers", "60", "--topics", "3", "--topics-per-conn", "2",
        "--rate", "150", "--duration", "2",
    )  # fmt: skip
    result = read(out, printed)
    assert code == 0, printed
    assert_exact(result, 300, 200, 60)
    assert result["publish"]["requests"] == result["publish"]["accepted"]  # one update per request: no batches
    assert "protocol mercure" in printed


@pytest.mark.timeout(90)
def test_the_compiled_worker_and_publisher_drive_the_hub_too(node: Node, tmp_path: Path) -> None:
    try:
        native.build()
        native.build_publisher()
    except native.NativeUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "result.json"
    code, printed = run_tool(
        out, "--target", node.url, "--client", "native", "--publisher", "native", "--pipeline", "4",
        "--subscribers", "40", "--topics", "2", "--publishers", "2", "--rate", "200", "--duration", "1.5",
    )  # fmt: skip
    result = read(out, printed)
    assert code == 0, printed
    assert_exact(result, 300, 150, 40)


@NEEDS_REDIS
@pytest.mark.timeout(90)
def test_a_mercure_run_through_two_redis_nodes(redis_nodes: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = redis_nodes
    out = tmp_path / "result.json"
    code, printed = run_tool(
        out, "--target", a.url, "--target", b.url, "--subscribers", "40", "--topics", "2",
        "--publishers", "2", "--rate", "100", "--duration", "2",
    )  # fmt: skip
    result = read(out, printed)
    assert code == 0, printed
    assert_exact(result, 200, 100, 40)
    nodes = {n["node"]: n for n in result["nodes"]}
    assert len(nodes) == 2  # subscribers on both nodes, every update reaching both
    assert all(n["connects"] == 20 for n in nodes.values())


async def open_stream(sub: Subscriber, port: int) -> StreamProtocol:
    """One connect of ``sub`` (with its cursor as Last-Event-ID), until the response head was read."""
    request = get_request(sub.target, sub.path, sub.last_id, sub.token)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(functools.partial(StreamProtocol, sub, request), "127.0.0.1", port)
    assert await protocol.opened
    return protocol


def mercure_token() -> str:
    """A Mercure token that may publish and subscribe to every topic."""
    return jwt.encode(
        {"aud": AUDIENCE, "exp": int(time.time() + 600),
         "authorization_details": [{"type": "mercure", "actions": ["publish", "subscribe"],
                                    "topics": [{"match": "*"}]}]},
        SECRET, algorithm="HS256", headers={"typ": "at+jwt"},
    )  # fmt: skip


@pytest.mark.timeout(30)
async def test_a_resume_answered_earliest_counts_as_a_reset(node: Node) -> None:
    publisher = mercure_token()
    topic = f"lt-{secrets.token_hex(3)}-0"
    async with httpx.AsyncClient(base_url=node.url) as http:
        answer = await http.post(HUB, data={"topic": topic, "data": "0 1 1 x"},
                                 headers={"authorization": f"Bearer {publisher}"})  # fmt: skip
    assert answer.status_code == 200
    update_id = answer.text
    recorder = Recorder()
    path = subscribe_path("herald", [topic], "mercure")
    target = f"127.0.0.1:{node.port}"

    # Resumed exactly from the update's id: no reset.
    exact = Subscriber(0, target, path, [0], recorder, token=publisher)
    exact.last_id_raw = update_id.encode()
    (await open_stream(exact, node.port)).transport.close()  # type: ignore[union-attr]
    assert exact.resets == 0
    # Fresh (no cursor), and asking for "earliest" itself: no reset either.
    fresh = Subscriber(1, target, path, [0], recorder, token=publisher)
    (await open_stream(fresh, node.port)).transport.close()  # type: ignore[union-attr]
    asked = Subscriber(2, target, path, [0], recorder, token=publisher)
    asked.last_id_raw = b"earliest"
    (await open_stream(asked, node.port)).transport.close()  # type: ignore[union-attr]
    assert fresh.resets == asked.resets == 0
    # An id the hub never issued (from the future): history can't cover it, the hub answers earliest.
    lost = Subscriber(3, target, path, [0], recorder, token=publisher)
    lost.last_id_raw = b"#9" + b"9" * 17
    (await open_stream(lost, node.port)).transport.close()  # type: ignore[union-attr]
    assert lost.resets == 1
    assert dict(recorder.reset_reasons) == {"earliest": 1}


def exits_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        from_args(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_combinations_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HERALD_JWT_SECRET", SECRET)
    monkeypatch.setenv("HERALD_MERCURE_AUDIENCE", AUDIENCE)
    mercure = ["--protocol", "mercure", "--quiet"]
    assert "not with --system nchan" in exits_2([*mercure, "--system", "nchan"], capsys)
    assert "not with --publish redis" in exits_2(
        [*mercure, "--publish", "redis", "--redis-url", "redis://127.0.0.1:6379/0"], capsys
    )
    assert "no batches" in exits_2([*mercure, "--publisher", "native", "--per-request", "5"], capsys)
    assert "--mercure-audience needs --protocol mercure" in exits_2(["--mercure-audience", AUDIENCE], capsys)
    assert "invalid choice" in exits_2(["--protocol", "sse"], capsys)
    monkeypatch.delenv("HERALD_MERCURE_AUDIENCE")
    assert "HERALD_MERCURE_AUDIENCE" in exits_2(mercure, capsys)
    monkeypatch.delenv("HERALD_JWT_SECRET")
    assert "no publish without a token" in exits_2(mercure, capsys)
    # And from the command line, as an operator sees it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    done = subprocess.run([sys.executable, "-m", "workers.loadtest", "--protocol", "mercure", "--system", "nchan"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert "--protocol mercure" in done.stderr


def test_the_minted_token_is_a_mercure_token_for_the_runs_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_JWT_SECRET", SECRET)
    monkeypatch.delenv("HERALD_MERCURE_AUDIENCE", raising=False)
    config = from_args(["--protocol", "mercure", "--mercure-audience", AUDIENCE, "--topics", "2",
                        "--topics-per-conn", "2"])  # fmt: skip
    assert config.token is not None
    assert config.auth == "minted"
    assert jwt.get_unverified_header(config.token)["typ"] == "at+jwt"
    claims = jwt.decode(config.token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    topics = [{"match": f"lt-{config.run_id}-*", "match_type": "urlpattern"}]
    assert claims["authorization_details"] == [
        {"type": "mercure", "actions": ["publish"], "topics": topics},
        {"type": "mercure", "actions": ["subscribe"], "topics": topics},
    ]
    assert config.batch == 1
    assert config.subscribe_path([0, 1]) == f"{HUB}?match=lt-{config.run_id}-0&match=lt-{config.run_id}-1"
    assert subscribe_path("herald", ["a b/c?"], "mercure") == f"{HUB}?match=a%20b%2Fc%3F"
    assert config.to_json()["protocol"] == "mercure"
    assert "token" not in config.to_json()
    native_run = from_args([])
    assert (native_run.protocol, native_run.mercure_audience) == ("native", None)


@pytest.mark.timeout(60)
def test_the_compiled_worker_counts_a_resume_answered_earliest_as_a_reset() -> None:
    # A hub retaining 5 updates: subscribers miss 10, resume, and the hub can't cover their cursor.
    try:
        native.build()
    except native.NativeUnavailable as exc:
        pytest.skip(str(exc))
    topic = f"lt-{secrets.token_hex(3)}-0"
    token = mercure_token()
    with run_server(node_env(HERALD_REPLAY_SIZE="5")) as small, httpx.Client(base_url=small.url) as http:

        def publish(seqs: range) -> None:
            for seq in seqs:
                answer = http.post(HUB, data={"topic": topic, "data": payload(0, seq, time.time_ns(), 40)},
                                   headers={"authorization": f"Bearer {token}"})  # fmt: skip
                assert answer.status_code == 200

        path = subscribe_path("herald", [topic], "mercure")
        with NativeClient([(i, f"127.0.0.1:{small.port}", path, [0]) for i in range(5)], token=token) as client:
            client.ready()
            publish(range(1, 2))  # every subscriber's cursor is then update 1's id
            client.send({"cmd": "expect", "last": {"0": 1}})
            client.wait_for("caught_up", 20)
            client.send({"cmd": "disconnect"})
            client.wait_for("disconnected", 20)
            publish(range(2, 12))  # 2..6 leave the hub's history
            client.send({"cmd": "reconnect"})
            client.send({"cmd": "expect", "last": {"0": 11}})
            client.wait_for("caught_up", 20)
            result = client.finish({0: 11})
    subs = result["subscribers"]
    assert [s["resets"] for s in subs] == [1] * 5
    assert result["reset_reasons"] == {"earliest": 5}
    assert [(s["delivered"], s["lost"], s["duplicated"]) for s in subs] == [(6, 5, 0)] * 5  # 1, then 7..11
