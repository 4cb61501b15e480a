"""Access control against real nodes, on both brokers: the token matrix, scopes, token locations, expiry, CORS.

Every node here is a real ``python -m api`` process with a key configured
(a secret, an RSA public key, or a JWKS URL served by the test), talked to
over sockets like any client. Each node runs once on the embedded broker and
once on a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api import token as tokens
from ops import launch
from ops.probe import free_port
from tests import redis_server
from tests.server import Node, run_server
from tests.sse_client import EventStream, publish

SECRET = secrets.token_urlsafe(48)
AUDIENCE = "https://push.test"
ISSUER = "https://app.test"
ALLOWED_ORIGIN = "http://app.test:8080"

BROKERS = [
    pytest.param("memory", id="memory"),
    pytest.param(
        "redis",
        id="redis",
        marks=pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
    ),
]


def _broker_env(broker: str) -> dict[str, str]:
    return {"REDIS_URL": redis_server.shared_server().url} if broker == "redis" else {}


def mint(
    *,
    publish: list[str] | None = None,
    subscribe: list[str] | None = None,
    admin: bool = False,
    sub: str | None = None,
    ttl: float = 600,
    **overrides: Any,
) -> str:
    """A token for the secret node; ``overrides`` replace or (with None) drop claims."""
    body = tokens.claims(
        publish=publish or (),
        subscribe=subscribe or (),
        admin=admin,
        sub=sub,
        ttl=ttl,
        audience=AUDIENCE,
        issuer=ISSUER,
    )
    for name, value in overrides.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return jwt.encode(body, SECRET, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any]) -> str:
    """``alg: none``: what an attacker sends hoping the server takes the token's word for it."""
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}."


def hmac_token(claims: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """An HMAC token made by hand (PyJWT refuses a PEM key as an HMAC secret, rightly): the confusion attack."""
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module", params=BROKERS)
def secret_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """A node with HERALD_JWT_SECRET, an audience, an issuer, public topics and one CORS origin."""
    env = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_JWT_AUDIENCE": AUDIENCE,
        "HERALD_JWT_ISSUER": ISSUER,
        "HERALD_PUBLIC_TOPICS": "public/**,news",
        "HERALD_CORS_ORIGINS": ALLOWED_ORIGIN,
        "HERALD_HEARTBEAT": "1",
        **_broker_env(request.param),
    }
    with run_server(env) as node:
        yield node


@pytest.fixture
def topic() -> str:
    return f"user/42/t-{secrets.token_hex(6)}"


async def expect_nothing_new(node: Node, stream: EventStream, topic: str, token: str) -> None:
    """Nothing reached the stream before a marker event published now (so a refused publish left no trace)."""
    marker = (await publish(node.url, {"topic": topic, "data": "marker"}, token=token)).json()["id"]
    event = await stream.next_event(5)
    assert (event.last_event_id, event.data) == (marker, "marker")


# -- publishing -----------------------------------------------------------------


async def test_publish_without_a_token_is_401_with_a_bearer_challenge(secret_node: Node, topic: str) -> None:
    response = await publish(secret_node.url, {"topic": topic, "data": 1})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="herald"'
    assert "token" in response.json()["detail"]


BAD_TOKENS: dict[str, Any] = {
    "malformed": lambda: "not-a-token",
    "bad signature": lambda: jwt.encode(
        tokens.claims(publish=["**"], subscribe=["**"], audience=AUDIENCE, issuer=ISSUER), "x" * 40, "HS256"
    ),
    "alg none": lambda: unsigned_token(
        tokens.claims(publish=["**"], subscribe=["**"], audience=AUDIENCE, issuer=ISSUER)
    ),
    "algorithm not configured (HS512)": lambda: jwt.encode(
        tokens.claims(publish=["**"], subscribe=["**"], audience=AUDIENCE, issuer=ISSUER), SECRET, "HS512"
    ),
    "expired": lambda: mint(publish=["**"], subscribe=["**"], exp=int(time.time()) - 3600),
    "not yet valid": lambda: mint(publish=["**"], subscribe=["**"], nbf=int(time.time()) + 3600),
    "no exp": lambda: mint(publish=["**"], subscribe=["**"], exp=None),
    "wrong audience": lambda: mint(publish=["**"], subscribe=["**"], aud="https://elsewhere.test"),
    "no audience": lambda: mint(publish=["**"], subscribe=["**"], aud=None),
    "wrong issuer": lambda: mint(publish=["**"], subscribe=["**"], iss="https://evil.test"),
    "malformed herald claim": lambda: mint(herald={"publish": "**"}),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_unusable_tokens_are_401_invalid_token_for_publish_and_subscribe(
    secret_node: Node, topic: str, case: str
) -> None:
    token = BAD_TOKENS[case]()
    async with httpx.AsyncClient(timeout=10) as client:
        published = await client.post(
            f"{secret_node.url}/publish", json={"topic": topic, "data": 1}, headers=bearer(token)
        )
        subscribed = await client.get(f"{secret_node.url}/events", params={"topic": topic}, headers=bearer(token))
    for response in (published, subscribed):
        assert response.status_code == 401, (case, response.text)
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="herald", error="invalid_token"'), challenge
        assert token not in response.text or not token


async def test_publish_outside_the_tokens_scope_is_403_and_publishes_nothing(secret_node: Node, topic: str) -> None:
    reader = mint(subscribe=["user/{sub}/**"], sub="42")
    writer = mint(publish=["user/*/t-*"])
    narrow = mint(publish=["orders/*"])
    async with await EventStream.open(secret_node.url, [topic], headers=bearer(reader)) as stream:
        assert stream.response.status_code == 200
        single = await publish(secret_node.url, {"topic": topic, "data": "no"}, token=narrow)
        batch = await publish(
            secret_node.url, [{"topic": "orders/1", "data": "no"}, {"topic": topic, "data": "no"}], token=narrow
        )
        for response in (single, batch):
            assert response.status_code == 403
            assert response.headers["www-authenticate"].startswith('Bearer realm="herald", error="insufficient_scope"')
            assert repr(topic) in response.json()["detail"]
        await expect_nothing_new(secret_node, stream, topic, writer)
    # The batch's allowed half was not published either: a resume from the start finds only what came after.
    orders = f"orders/{secrets.token_hex(4)}"
    refused = await publish(
        secret_node.url, [{"topic": orders, "data": "no"}, {"topic": topic, "data": "no"}], token=narrow
    )
    assert refused.status_code == 403
    orders_reader = mint(subscribe=["orders/**"])
    async with await EventStream.open(
        secret_node.url, [orders], headers=bearer(orders_reader), last_event_id="0"
    ) as stream:
        marker = (await publish(secret_node.url, {"topic": orders, "data": "ok"}, token=narrow)).json()["id"]
        seen: list[str] = []
        while marker not in seen:
            event = await stream.next_event(5)
            if event.type != "reset":
                seen.append(event.last_event_id)
    assert seen == [marker]


async def test_publish_within_scope_is_accepted(secret_node: Node, topic: str) -> None:
    response = await publish(secret_node.url, [{"topic": topic, "data": 1}], token=mint(publish=["user/**"]))
    assert response.status_code == 201


def test_publish_must_be_json(secret_node: Node, topic: str) -> None:
    token = mint(publish=["**"])
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = bearer(token) | ({"Content-Type": content_type} if content_type else {})
        response = httpx.post(f"{secret_node.url}/publish", content=b'{"topic":"x","data":1}', headers=headers)
        assert response.status_code == 415, content_type
        assert "application/json" in response.json()["detail"]
    ok = httpx.post(
        f"{secret_node.url}/publish",
        content=json.dumps({"topic": topic, "data": 1}),
        headers=bearer(token) | {"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 201


def test_publishers_token_is_taken_from_the_header_only(secret_node: Node, topic: str) -> None:
    """A cookie rides along on any cross-site request: it must never authorize a publish."""
    token = mint(publish=["**"])
    for kwargs in ({"cookies": {"herald_token": token}}, {"params": {"access_token": token}}):
        response = httpx.post(f"{secret_node.url}/publish", json={"topic": topic, "data": 1}, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 401


# -- subscribing ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "query", "cookie"])
async def test_each_token_location_opens_a_stream(secret_node: Node, topic: str, where: str) -> None:
    token = mint(subscribe=["user/{sub}/**"], sub="42")
    locations: dict[str, dict[str, Any]] = {
        "header": {"headers": bearer(token)},
        "query": {"params": [("access_token", token)]},
        "cookie": {"headers": {"Cookie": f"theme=dark; herald_token={token}"}},
    }
    kwargs = locations[where]
    async with await EventStream.open(secret_node.url, [topic], **kwargs) as stream:
        assert stream.response.status_code == 200
        sent = (await publish(secret_node.url, {"topic": topic, "data": where}, token=mint(publish=["**"]))).json()
        event = await stream.next_event()
    assert (event.last_event_id, event.data) == (sent["id"], where)


async def test_explicit_token_wins_over_ambient_ones(secret_node: Node, topic: str) -> None:
    good = mint(subscribe=["**"])
    bad = mint(subscribe=["**"], exp=int(time.time()) - 3600)
    async with httpx.AsyncClient(timeout=10) as client:
        header_first = await client.get(
            f"{secret_node.url}/events",
            params={"topic": topic, "access_token": good},
            headers=bearer(bad) | {"Cookie": f"herald_token={good}"},
        )
        query_before_cookie = await client.get(
            f"{secret_node.url}/events",
            params={"topic": topic, "access_token": bad},
            headers={"Cookie": f"herald_token={good}"},
        )
    assert header_first.status_code == query_before_cookie.status_code == 401


def test_subscribing_without_a_token_is_401(secret_node: Node, topic: str) -> None:
    response = httpx.get(f"{secret_node.url}/events", params={"topic": topic})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="herald"'


def test_a_forbidden_topic_among_several_gets_no_stream(secret_node: Node, topic: str) -> None:
    token = mint(subscribe=["user/{sub}/**"], sub="42")
    response = httpx.get(
        f"{secret_node.url}/events", params=[("topic", topic), ("topic", "user/43/x")], headers=bearer(token)
    )
    assert response.status_code == 403
    assert response.headers["www-authenticate"].startswith('Bearer realm="herald", error="insufficient_scope"')
    assert "'user/43/x'" in response.json()["detail"]
    assert response.headers["content-type"].startswith("application/json")


async def test_public_topics_need_no_token_but_a_private_one_beside_them_does(secret_node: Node) -> None:
    public = f"public/{secrets.token_hex(4)}"
    async with await EventStream.open(secret_node.url, [public, "news"]) as stream:
        assert stream.response.status_code == 200
        sent = (await publish(secret_node.url, {"topic": public, "data": "hi"}, token=mint(publish=["**"]))).json()
        assert (await stream.next_event()).last_event_id == sent["id"]
    async with httpx.AsyncClient(timeout=10) as client:
        mixed = await client.get(f"{secret_node.url}/events", params=[("topic", public), ("topic", "user/42/x")])
    assert mixed.status_code == 401


async def test_replay_obeys_the_same_rule(secret_node: Node, topic: str) -> None:
    """Resuming is subscribing: events of a topic the token doesn't cover are not replayed to it."""
    writer = mint(publish=["**"])
    before = (await publish(secret_node.url, {"topic": topic, "data": "before"}, token=writer)).json()["id"]
    secret = (await publish(secret_node.url, {"topic": topic, "data": "secret"}, token=writer)).json()["id"]
    other = mint(subscribe=["user/{sub}/**"], sub="43")
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.get(
            f"{secret_node.url}/events", params={"topic": topic}, headers=bearer(other) | {"Last-Event-ID": before}
        )
    assert refused.status_code == 403
    assert "secret" not in refused.text
    owner = mint(subscribe=["user/{sub}/**"], sub="42")
    async with await EventStream.open(secret_node.url, [topic], headers=bearer(owner), last_event_id=before) as stream:
        events = await stream.take(1)
    assert [(e.last_event_id, e.data) for e in events] == [(secret, "secret")]


async def test_sub_selector_reaches_only_the_subjects_own_topics(secret_node: Node) -> None:
    token = mint(subscribe=["user/{sub}/*"], sub="1")
    async with httpx.AsyncClient(timeout=10) as client:

        async def status(topic: str) -> int:
            async with client.stream(
                "GET", f"{secret_node.url}/events", params={"topic": topic}, headers=bearer(token)
            ) as response:
                return response.status_code

        assert await status("user/1/inbox") == 200
        assert await status("user/12/inbox") == 403
        assert await status("user/1/inbox/deep") == 403
        assert await status("user/2/inbox") == 403


async def test_stream_ends_within_a_second_of_its_tokens_expiry(secret_node: Node, topic: str) -> None:
    exp = int(time.time()) + 2
    token = mint(subscribe=["user/**"], exp=exp)
    async with await EventStream.open(secret_node.url, [topic], headers=bearer(token)) as stream:
        assert stream.response.status_code == 200
        await asyncio.wait_for(stream.ended.wait(), 6)
        ended = time.time()
    assert exp - 0.05 <= ended <= exp + 1.0, ended - exp
    # Reconnecting with the expired token is refused: EventSource stops, the page gets a fresh token.
    async with httpx.AsyncClient(timeout=10) as client:
        again = await client.get(f"{secret_node.url}/events", params={"topic": topic}, headers=bearer(token))
    assert again.status_code == 401


async def test_a_stream_on_public_topics_only_outlives_any_token(secret_node: Node) -> None:
    token = mint(subscribe=["**"], exp=int(time.time()) + 1)
    async with await EventStream.open(secret_node.url, ["news"], headers=bearer(token)) as stream:
        assert stream.response.status_code == 200
        # Heartbeats every second: the stream is still delivering comments well past exp.
        deadline = time.time() + 2.5
        while time.time() < deadline:
            stream.comment_seen.clear()
            await asyncio.wait_for(stream.comment_seen.wait(), 2.5)
        assert not stream.ended.is_set()


# -- admin ------------------------------------------------------------------------


def test_stats_needs_an_admin_token_and_health_stays_open(secret_node: Node) -> None:
    url = secret_node.url
    assert httpx.get(f"{url}/stats").status_code == 401
    assert httpx.get(f"{url}/stats", headers=bearer(mint(subscribe=["**"], publish=["**"]))).status_code == 403
    stats = httpx.get(f"{url}/stats", headers=bearer(mint(admin=True)))
    assert stats.status_code == 200
    assert stats.json()["auth"]["tokens_verified"] >= 1
    assert httpx.get(f"{url}/stats", cookies={"herald_token": mint(admin=True)}).status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200


# -- CORS -------------------------------------------------------------------------

CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials", "vary")


def _cors(response: httpx.Response) -> dict[str, str | None]:
    return {name: response.headers.get(name) for name in CORS_HEADERS}


def test_cors_lets_the_listed_origin_in_on_both_routes_alike(secret_node: Node, topic: str) -> None:
    url = secret_node.url
    origin = {"Origin": ALLOWED_ORIGIN}
    with httpx.stream("GET", f"{url}/events", params={"topic": "news"}, headers=origin, timeout=10) as stream_answer:
        shortcut = _cors(stream_answer)
        assert stream_answer.status_code == 200
    refused_stream = _cors(httpx.get(f"{url}/events", params={"topic": topic}, headers=origin))
    published = _cors(httpx.post(f"{url}/publish", json={"topic": topic, "data": 1}, headers=origin))
    expected = {
        "access-control-allow-origin": ALLOWED_ORIGIN,
        "access-control-allow-credentials": "true",
        "vary": "Origin",
    }
    assert shortcut == refused_stream == published == expected


def test_cors_keeps_other_origins_out(secret_node: Node) -> None:
    url = secret_node.url
    evil = {"Origin": "http://evil.test"}
    with httpx.stream("GET", f"{url}/events", params={"topic": "news"}, headers=evil, timeout=10) as answer:
        assert "access-control-allow-origin" not in answer.headers
    preflight = httpx.options(f"{url}/publish", headers=evil | {"Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("path", ["/events", "/publish"])
def test_cors_preflight_is_answered_for_the_listed_origin(secret_node: Node, path: str) -> None:
    response = httpx.options(
        f"{secret_node.url}{path}",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST" if path == "/publish" else "GET",
            "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id"} <= allowed


# -- public keys ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module", params=BROKERS)
def public_key_node(request: pytest.FixtureRequest, rsa_key: rsa.RSAPrivateKey) -> Iterator[Node]:
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as file:
        file.write(_pem(rsa_key))
    try:
        env = {"HERALD_JWT_PUBLIC_KEY": f"@{file.name}", **_broker_env(request.param)}
        with run_server(env) as node:
            yield node
    finally:
        os.unlink(file.name)


def test_public_key_node_accepts_its_keys_tokens_only(public_key_node: Node, rsa_key: rsa.RSAPrivateKey) -> None:
    claims = tokens.claims(subscribe=["**"], publish=["**"])
    good = jwt.encode(claims, rsa_key, algorithm="RS256")
    other_rsa = jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256")
    other_ec = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    confused = hmac_token(claims, _pem(rsa_key))  # HS256 keyed with the public key's bytes
    url = f"{public_key_node.url}/publish"
    assert httpx.post(url, json={"topic": "a", "data": 1}, headers=bearer(good)).status_code == 201
    for name, token in {
        "other RSA key": other_rsa,
        "EC key, ES256": other_ec,
        "HS256 signed with the public key": confused,
        "alg none": unsigned_token(claims),
    }.items():
        response = httpx.post(url, json={"topic": "a", "data": 1}, headers=bearer(token))
        assert response.status_code == 401, name
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


# -- JWKS -------------------------------------------------------------------------


class JwksServer:
    """A JWKS endpoint on a loopback port whose key set the test swaps (a rotation)."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def publish_keys(self, *keys: tuple[str, ec.EllipticCurvePrivateKey]) -> None:
        jwks = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            jwks.append(jwk | {"kid": kid, "use": "sig", "alg": "ES256"})
        self.document = {"keys": jwks}


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def es256(key: ec.EllipticCurvePrivateKey, kid: str, **claims: Any) -> str:
    body = tokens.claims(subscribe=["**"], publish=["**"]) | claims
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})


@pytest.mark.parametrize("broker", BROKERS)
def test_jwks_rotation_works_without_a_restart(jwks: JwksServer, broker: str) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks.publish_keys(("k1", old))
    with run_server({"HERALD_JWKS_URL": jwks.url, **_broker_env(broker)}) as node:
        url = f"{node.url}/publish"

        def post(token: str) -> int:
            return httpx.post(url, json={"topic": "a", "data": 1}, headers=bearer(token), timeout=10).status_code

        assert post(es256(old, "k1")) == 201
        assert post(es256(new, "k1")) == 401  # the right kid, the wrong key
        assert post(es256(new, "k-unknown")) == 401
        # Rotation: the issuer publishes k2 and withdraws k1. No restart.
        jwks.publish_keys(("k2", new))
        assert post(es256(new, "k2")) == 201
        fetches = jwks.fetches
        assert post(es256(old, "k1", exp=int(time.time()) + 500)) == 401  # withdrawn (and not from the cache)
        # A flood of made-up kids costs at most a fetch a second.
        started = time.monotonic()
        for i in range(3):
            assert post(es256(new, f"made-up-{i}")) == 401
        elapsed = time.monotonic() - started
        assert jwks.fetches - fetches <= elapsed + 2


# -- refusing to start ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HERALD_JWT_SECRET": "too-short"}, "at least 32"),
        ({"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_ALGORITHMS": "none"}, "'none' is never accepted"),
        ({"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_ALGORITHMS": "RS256"}, "needs a public key"),
        ({"HERALD_JWKS_URL": "http://127.0.0.1:1/jwks", "HERALD_JWT_ALGORITHMS": "HS256"}, "HMAC"),
        ({"HERALD_JWT_PUBLIC_KEY": "not a pem"}, "not a PEM public key"),
        ({"HERALD_JWT_SECRET": SECRET, "HERALD_JWKS_URL": "http://127.0.0.1:1/jwks"}, "not several"),
        ({"HERALD_JWT_SECRET": SECRET, "HERALD_PUBLIC_TOPICS": "user/{sub}"}, "{sub}"),
    ],
)
def test_unusable_key_configuration_refuses_to_start(env: dict[str, str], says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api"],
        env=launch.node_env(free_port(), extra=env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0
    assert says in result.stderr, result.stderr
    assert SECRET not in result.stderr
