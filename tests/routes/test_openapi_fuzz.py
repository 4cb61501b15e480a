"""Fuzz the HTTP API from its own OpenAPI document with schemathesis, access control off and on.

Two real nodes (:func:`tests.server.run_server`) serve the document at
``/openapi.json``; schemathesis loads it from there, so what is fuzzed is
what a node publishes. Three callers:

* the node with access control off, no credentials;
* the node with ``HERALD_JWT_SECRET``, with a token that may do everything
  (publish and subscribe ``**``, admin);
* the same node with no token: besides the checks, each operation may only
  answer what :data:`ANONYMOUS_STATUSES` allows (401, or the 400 a bad
  subscription gets before its token is looked at), never a 2xx.

Every operation is fuzzed with positive data (fits the document) and, where
it takes any input, negative data. Each answer goes through schemathesis'
default checks, among them ``not_a_server_error``,
``status_code_conformance``, ``content_type_conformance``,
``response_schema_conformance`` and ``response_headers_conformance``: no
5xx, and no status, media type, body or header the document does not
declare. Two default checks are left out (:data:`EXCLUDED_CHECKS`), because
they judge the requests, not the answers, and misfire here:

* ``negative_data_rejection`` wants "invalid" data refused, but query and
  header values are strings on the wire: the number schemathesis puts in
  ``?topic=`` as a wrong type arrives as a valid topic name, and the stream
  rightly opens (``GET /events?topic=2.220446049250313e-16`` answers 200);
* ``positive_data_acceptance`` wants every schema-valid request accepted,
  but reusing an ``Idempotency-Key`` for another body is refused with 422
  whatever the schema says (as the IETF Idempotency-Key draft asks), and
  the fuzz reuses keys all the time.

What ``positive_data_acceptance`` would have guarded is asserted directly
instead: the positive fuzz of ``POST /publish`` must publish something
(answer 201 at least once), so it can't pass having only been refused.

The cases come from ``schema[path][method].as_strategy(mode)`` under
Hypothesis' ``@given``, schemathesis' documented API for custom workflows,
one test per caller, operation and mode. Schemathesis' pytest integration
for a schema only known at run time (``schemathesis.pytest.from_fixture``)
fails under pytest 9 (``'Function' object has no attribute '_nodeid'``).

``GET /events`` never ends, and it is fuzzed rather than left out:
schemathesis (4.x) reads a response whose ``Content-Type`` is
``text/event-stream`` only until the request's read timeout, then marks it
cut short, while any other answer must arrive whole within the timeout or
the call fails. So a call only ends early when its status line said
``200 text/event-stream``, and :func:`stream_starts_with_retry` adds that
such a stream's first bytes are its ``retry:`` line. Each open stream costs
:data:`STREAM_READ_SECONDS`, which is what bounds the examples.
:func:`test_subscriptions_answer_as_documented` makes a few calls of its
own through the same checks (a stream, and each 400), so the stream path is
covered whatever the fuzz happened to generate.

:func:`test_publish_body_is_documented` checks the document itself: every
``$ref`` must resolve and schemathesis must see the JSON body of ``POST
/publish``. With a dangling reference schemathesis silently drops the body
and would fuzz ``POST /publish`` with no body at all (every answer a 415),
so the fuzz of ``POST /publish`` refuses to run without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import BaseSchema, Case, CheckContext, GenerationMode, Response
from schemathesis.core.result import Ok

from api.token import mint
from tests.server import Node, run_server

SECRET = "openapi-fuzz-secret-0123456789abcdef"  # >= 32 bytes: access control on
STREAM_READ_SECONDS = 0.5
"""How long an open event stream is read before the client closes it."""
STREAM_TIMEOUT = (5.0, STREAM_READ_SECONDS)
REQUEST_TIMEOUT = (5.0, 10.0)
"""(connect, read) for every other call: any answer but a stream must arrive whole within it."""

FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
STREAM_SETTINGS = settings(FUZZ_SETTINGS, max_examples=15)
"""Fewer for ``GET /events``: every stream opened is read for STREAM_READ_SECONDS."""

EXCLUDED_CHECKS = [schemathesis.checks.negative_data_rejection, schemathesis.checks.positive_data_acceptance]
"""Request-side checks that misfire on this API (see the module docstring)."""

OPERATIONS = (
    "POST /publish",
    "GET /events",
    "GET /healthz",
    "GET /readyz",
    "GET /probe",
    "GET /stats",
    "GET /metrics",
    "GET /cluster",
)
"""Every operation of the document (:func:`test_every_operation_is_fuzzed` keeps this list whole)."""
TAKES_INPUT = {"POST /publish", "GET /events"}
"""The operations with parameters or a body: the only ones negative data exists for."""

ANONYMOUS_STATUSES = {
    "POST /publish": {401},
    "GET /events": {400, 401},
    "GET /stats": {401},
    "GET /metrics": {401},
    "GET /cluster": {401},
    "GET /healthz": {200},
    "GET /readyz": {200},
    "GET /probe": {204},
}
"""What a request with no token may get from the node with access control on, per operation."""

RUNS = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or label in TAKES_INPUT
]


@pytest.fixture(scope="module")
def open_node() -> Iterator[Node]:
    with run_server({"HERALD_NODE_ID": "fuzz-open"}) as node:
        yield node


@pytest.fixture(scope="module")
def secret_node() -> Iterator[Node]:
    with run_server({"HERALD_NODE_ID": "fuzz-secret", "HERALD_JWT_SECRET": SECRET}) as node:
        yield node


@pytest.fixture(scope="module")
def open_schema(open_node: Node) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{open_node.url}/openapi.json", timeout=10)


@pytest.fixture(scope="module")
def secret_schema(secret_node: Node) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{secret_node.url}/openapi.json", timeout=10)


@pytest.fixture(scope="module")
def broad_token() -> str:
    return mint(SECRET, publish=["**"], subscribe=["**"], admin=True, sub="fuzz", ttl=3600)


def stream_starts_with_retry(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """A 200 from ``GET /events`` is an event stream whose first bytes are its ``retry:`` line."""
    if case.operation.path == "/events" and response.status_code == 200:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.startswith("text/event-stream"), f"200 from /events is {content_type!r}"
        assert response.content.startswith(b"retry: "), f"the stream began with {response.content[:80]!r}"
    return None


def call(case: Case[Any], token: str | None) -> Response:
    """Send ``case`` (with ``token`` as a Bearer token) and run every check on the answer."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    timeout = STREAM_TIMEOUT if case.operation.path == "/events" else REQUEST_TIMEOUT
    return case.call_and_validate(
        headers=headers,
        timeout=timeout,
        excluded_checks=EXCLUDED_CHECKS,
        additional_checks=[stream_starts_with_retry],
    )


def fuzz(schema: BaseSchema, label: str, mode: GenerationMode, token: str | None = None) -> list[int]:
    """Run ``label`` (``METHOD /path``) with generated ``mode`` data through the checks; the statuses seen."""
    method, path = label.split(" ")
    operation = schema[path][method]
    if label == "POST /publish":
        # Without one, every case is a bare POST (and there is nothing to negate): see test_publish_body_is_documented.
        assert list(operation.body), "schemathesis reads no request body for POST /publish in /openapi.json"
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @(STREAM_SETTINGS if path == "/events" else FUZZ_SETTINGS)
    def run(case: Case[Any]) -> None:
        statuses.append(call(case, token).status_code)

    run()
    return statuses


def assert_published(label: str, mode: GenerationMode, statuses: list[int]) -> None:
    if label == "POST /publish" and mode is GenerationMode.POSITIVE:
        assert 201 in statuses, f"the positive fuzz published nothing; answers: {sorted(set(statuses))}"


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_fuzz_without_access_control(open_schema: BaseSchema, label: str, mode: GenerationMode) -> None:
    assert_published(label, mode, fuzz(open_schema, label, mode))


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_fuzz_with_a_token_that_may_do_everything(
    secret_schema: BaseSchema, broad_token: str, label: str, mode: GenerationMode
) -> None:
    assert_published(label, mode, fuzz(secret_schema, label, mode, broad_token))


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_fuzz_without_a_token(secret_schema: BaseSchema, label: str, mode: GenerationMode) -> None:
    statuses = fuzz(secret_schema, label, mode)
    assert set(statuses) <= ANONYMOUS_STATUSES[label], f"{label} without a token answered {sorted(set(statuses))}"


SUBSCRIPTIONS = [
    pytest.param({"topic": ["fuzz-direct"]}, 200, id="a stream"),
    pytest.param({}, 400, id="no topic"),
    pytest.param({"topic": ["a b"]}, 400, id="invalid topic"),
    pytest.param({"topic": ["x" * 201]}, 400, id="topic too long"),
    pytest.param({"topic": [f"t{i}" for i in range(65)]}, 400, id="too many topics"),
]


@pytest.mark.parametrize(("query", "expected"), SUBSCRIPTIONS)
@pytest.mark.parametrize("caller", ["open", "token", "anonymous"])
def test_subscriptions_answer_as_documented(
    caller: str, query: dict[str, Any], expected: int, request: pytest.FixtureRequest
) -> None:
    schema: BaseSchema = request.getfixturevalue("open_schema" if caller == "open" else "secret_schema")
    token: str | None = request.getfixturevalue("broad_token") if caller == "token" else None
    if caller == "anonymous" and expected == 200:
        expected = 401
    response = call(schema["/events"]["GET"].Case(query=query), token)
    assert response.status_code == expected, response.text[:300]


@pytest.mark.parametrize("which", ["open_schema", "secret_schema"])
def test_every_operation_is_fuzzed(which: str, request: pytest.FixtureRequest) -> None:
    schema: BaseSchema = request.getfixturevalue(which)
    labels = {r.ok().label if isinstance(r, Ok) else f"unusable: {r.err()}" for r in schema.get_all_operations()}
    assert labels == set(OPERATIONS)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolves(document: dict[str, Any], ref: str) -> bool:
    if not ref.startswith("#/"):
        return False
    target: Any = document
    for part in ref[2:].split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or key not in target:
            return False
        target = target[key]
    return True


def test_publish_body_is_documented(open_node: Node, open_schema: BaseSchema) -> None:
    document = httpx.get(f"{open_node.url}/openapi.json", timeout=10).json()
    dangling = sorted({ref for ref in _refs(document) if not _resolves(document, ref)})
    assert not dangling, f"references to nothing in /openapi.json: {dangling}"
    media_types = [body.media_type for body in open_schema["/publish"]["POST"].body]
    assert media_types == ["application/json"], f"POST /publish bodies as schemathesis reads them: {media_types}"
