"""POST /publish against a real node: the contract, and a clear 4xx for every bad input."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest

from tests.server import Node
from tests.sse_client import EventStream

pytestmark = pytest.mark.http_contract  # on both serving paths: the adapter and stock uvicorn (conftest)


def post(node: Node, body: Any = None, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(f"{node.url}/publish", content=raw, headers={"Content-Type": "application/json"})
    return httpx.post(f"{node.url}/publish", json=body)


def test_publish_one_event_answers_201_with_id_and_topic(node: Node, topic: str) -> None:
    response = post(node, {"topic": topic, "data": {"hello": "world"}})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "topic"}
    assert body["topic"] == topic
    assert isinstance(body["id"], str)
    assert body["id"].isdigit()
    assert response.headers["x-node-id"] == "test-node"


def test_publish_batch_answers_in_order_with_increasing_ids(node: Node, topic: str) -> None:
    other = topic + "-b"
    batch = [{"topic": [topic, other][i % 2], "data": i, "event": "n"} for i in range(10)]
    response = post(node, batch)
    assert response.status_code == 201
    body = response.json()
    assert [item["topic"] for item in body] == [item["topic"] for item in batch]
    ids = [int(item["id"]) for item in body]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_increase_across_topics_and_requests(node: Node, topic: str) -> None:
    ids = [int(post(node, {"topic": f"{topic}-{i % 3}", "data": i}).json()["id"]) for i in range(20)]
    assert all(a < b for a, b in itertools.pairwise(ids))


@pytest.mark.parametrize(
    "name",
    ["a", "A-z_0.9:/@x", "user@example.com/inbox", "x" * 200, "orders:eu-west-1/2024"],
)
def test_valid_topic_names_are_accepted(node: Node, name: str) -> None:
    assert post(node, {"topic": name, "data": 1}).status_code == 201


@pytest.mark.parametrize(
    "name",
    ["", "a b", "a\nb", "a\rb", "x" * 201, "café", "a#b", "a?b", "a%b", "a\x00b", "a+b", "a,b"],
)
def test_invalid_topic_names_are_refused_with_422(node: Node, name: str) -> None:
    response = post(node, {"topic": name, "data": 1})
    assert response.status_code == 422
    assert "topic" in json.dumps(response.json())


@pytest.mark.parametrize("event", ["a", "Update.Done:v2_x-y", "e" * 64, "message"])
def test_valid_event_types_are_accepted(node: Node, topic: str, event: str) -> None:
    assert post(node, {"topic": topic, "data": 1, "event": event}).status_code == 201


@pytest.mark.parametrize("event", ["", "a b", "a\nb", "a\rdata: x", "e" * 65, "reset", "a/b", "a@b", "é"])
def test_invalid_or_reserved_event_types_are_refused_with_422(node: Node, topic: str, event: str) -> None:
    response = post(node, {"topic": topic, "data": 1, "event": event})
    assert response.status_code == 422
    assert "event" in json.dumps(response.json())


@pytest.mark.parametrize(
    "body",
    [
        {"data": 1},
        {"topic": "a"},
        {"topic": 5, "data": 1},
        {"topic": "a", "data": 1, "event": 3},
        {"topic": "a", "data": 1, "evnt": "typo"},
        5,
        "a string",
        [],
        [{"topic": "a", "data": 1}, {"topic": "bad topic", "data": 2}],
        [{"topic": "a", "data": 1}] * 1001,
        [[{"topic": "a", "data": 1}]],
    ],
)
def test_invalid_fields_are_refused_with_422_and_a_reason(node: Node, body: Any) -> None:
    response = post(node, body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b'{"topic": "a", "data": 1',
        b"not json",
        b'{"topic": "a", "data": NaN}',
        b'{"topic": "a", "data": Infinity}',
        b'{"topic": "a", "data": -Infinity}',
        b"\xff\xfe\x00garbage",
        b'{"topic": "a", "data": "\xc3\x28"}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_invalid_json_is_refused_with_400(node: Node, raw: bytes) -> None:
    response = post(node, raw=raw)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"topic": "a", "data": "\\ud800"}',
        b'{"topic": "a", "data": {"k": "\\udfff x"}}',
        b'{"topic": "a", "data": 1e400}',
        b"null",
    ],
)
def test_data_json_cannot_carry_is_refused_with_422(node: Node, raw: bytes) -> None:
    response = post(node, raw=raw)
    assert response.status_code == 422, response.text


def test_batch_of_1000_is_accepted(node: Node, topic: str) -> None:
    response = post(node, [{"topic": topic, "data": i} for i in range(1000)])
    assert response.status_code == 201
    assert len(response.json()) == 1000


def test_data_at_the_byte_limit_is_accepted_and_one_byte_over_is_413(small_node: Node, topic: str) -> None:
    # HERALD_MAX_EVENT_BYTES=1000 on small_node; "é" is two bytes in UTF-8.
    assert post(small_node, {"topic": topic, "data": "x" * 1000}).status_code == 201
    assert post(small_node, {"topic": topic, "data": "é" * 500}).status_code == 201
    response = post(small_node, {"topic": topic, "data": "é" * 500 + "x"})
    assert response.status_code == 413
    assert "1001" in response.json()["detail"]
    # Non-string data is measured as its compact JSON.
    assert post(small_node, {"topic": topic, "data": ["x" * 996]}).status_code == 201
    assert post(small_node, {"topic": topic, "data": ["x" * 997]}).status_code == 413


def test_oversized_request_body_is_413(small_node: Node, topic: str) -> None:
    body = [{"topic": topic, "data": "x" * 900} for _ in range(30)]  # over HERALD_MAX_BODY_BYTES=20000
    response = post(small_node, body)
    assert response.status_code == 413
    assert response.json()["detail"]


async def test_rejected_batch_publishes_nothing(small_node: Node, topic: str) -> None:
    first = post(small_node, {"topic": topic, "data": "before"}).json()["id"]
    bad_batch = [{"topic": topic, "data": "ok"}, {"topic": topic, "data": "x" * 2000}]
    assert post(small_node, bad_batch).status_code == 413
    reserved = [{"topic": topic, "data": "ok"}, {"topic": topic, "data": 1, "event": "reset"}]
    assert post(small_node, reserved).status_code == 422
    after = post(small_node, {"topic": topic, "data": "after"}).json()["id"]
    async with await EventStream.open(small_node.url, [topic], last_event_id=first) as stream:
        event = await stream.next_event()
    # The only event after `first` is `after`: nothing of the refused batches was published.
    assert (event.last_event_id, event.data) == (after, "after")


def test_bad_input_never_gets_a_500(node: Node) -> None:
    bodies: list[bytes] = [
        b'{"topic": "a", "data": {"deep": ' * 50 + b"1" + b"}" * 50 + b"}",
        b'{"topic": "a", "data": 123456789012345678901234567890}',
        b'{"topic": "a", "data": "\\u0000\\r\\n"}',
        b'{"topic": "a", "data": 1, "event": null}',
        b'{"topic": null, "data": 1}',
        b'[{"topic": "a", "data": 1}, 7]',
        b'{"topic": "a", "data": 1}{"topic": "b", "data": 2}',
        b'\xef\xbb\xbf{"topic": "a", "data": 1}',
    ]
    for raw in bodies:
        response = post(node, raw=raw)
        assert response.status_code < 500, (raw[:60], response.status_code, response.text)
        assert response.status_code in (201, 400, 422), (raw[:60], response.text)


async def test_idempotency_key_makes_a_retry_publish_nothing_again(node: Node, topic: str) -> None:
    key = f"order-{topic}"
    body = [{"topic": topic, "data": "a"}, {"topic": topic, "data": "b"}]
    start = post(node, {"topic": topic, "data": "start"}).json()["id"]
    headers = {"Idempotency-Key": key}
    async with httpx.AsyncClient(base_url=node.url) as client:
        first = await client.post("/publish", json=body, headers=headers)
        retry = await client.post("/publish", json=body, headers=headers)
        other = await client.post("/publish", json=body[:1], headers=headers)
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert other.status_code == 422
    end = post(node, {"topic": topic, "data": "end"}).json()["id"]
    async with await EventStream.open(node.url, [topic], last_event_id=start) as stream:
        events = await stream.take(3)
    assert [e.data for e in events] == ["a", "b", "end"]
    assert events[-1].last_event_id == end


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, "tab\there"])
def test_invalid_idempotency_key_is_400(node: Node, topic: str, key: str) -> None:
    response = httpx.post(f"{node.url}/publish", json={"topic": topic, "data": 1}, headers={"Idempotency-Key": key})
    assert response.status_code == 400
