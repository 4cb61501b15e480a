"""A node's log (api.node.logs): ``HERALD_LOG_FORMAT=text|json``, extra fields kept, never a token.

Real nodes are started with each format and their whole output (stdout and
stderr) is read back: in JSON every line is one object with time, level,
logger and message; in text, uvicorn's ``INFO:     ...`` lines. A node given a
token in every place a request can carry one (``?access_token=``, a
``Bearer`` header, the cookie), good or not, leaves none of them in its log.
An unknown format is refused at start. The formatter and the redaction are
also checked on their own, with the values no request would produce.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.node import logs
from api.token import mint
from ops import launch
from ops.probe import free_port
from tests.server import Node, run_server

SECRET = "log-test-secret-" + "k" * 40  # the node's HMAC secret
STOP_TIMEOUT = 15


def log_lines(node: Node) -> list[str]:
    return [line for line in node.log().splitlines() if line.strip()]


def stop(node: Node) -> str:
    """SIGTERM the node (so that its shutdown lines are written too); its whole output."""
    assert node.terminate(STOP_TIMEOUT) == 0, node.log()
    return node.log()


def parse_json_lines(lines: list[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= set(entry), line
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, line
        when = datetime.datetime.fromisoformat(entry["time"])
        assert when.utcoffset() == datetime.timedelta(0), line
        assert abs(time.time() - when.timestamp()) < 600, line
        entries.append(entry)
    return entries


@pytest.fixture
def json_node() -> Iterator[Node]:
    with run_server({"HERALD_LOG_FORMAT": "json", "HERALD_JWT_SECRET": SECRET}) as node:
        yield node


def test_json_log_is_one_object_per_line_and_names_no_token(json_node: Node) -> None:
    leaked = {
        "query": "query-secret-" + uuid.uuid4().hex,
        "bearer": "bearer-secret-" + uuid.uuid4().hex,
        "cookie": "cookie-secret-" + uuid.uuid4().hex,
    }
    wrong_key = mint("another-secret-" + "z" * 40, subscribe=["**"], ttl=600)  # well formed, not the node's
    expired = mint(SECRET, subscribe=["**"], ttl=-60)
    good = mint(SECRET, subscribe=["**"], publish=["**"], ttl=600)
    refused = [*leaked.values(), wrong_key, expired]
    tokens = [*refused, good]
    with httpx.Client(base_url=json_node.url, timeout=5) as client:
        for token in refused:
            assert client.get("/events", params={"topic": "logs", "access_token": token}).status_code in (401, 403)
            answer = client.post(
                "/publish", json={"topic": "a b", "data": 1}, headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code in (401, 403, 422), answer.text
            client.cookies.set("herald_token", token)
            assert client.get("/events", params={"topic": "logs"}).status_code in (401, 403)
            client.cookies.clear()
            assert client.get("/no-such-page", params={"access_token": token}).status_code == 404
        assert client.get("/events", params={"topic": "bad topic", "access_token": good}).status_code == 400
        published = client.post(
            "/publish", json={"topic": "logs", "data": 1}, headers={"Authorization": f"Bearer {good}"}
        )
        assert published.status_code == 201, published.text
        with client.stream("GET", "/events", params={"topic": "logs", "access_token": good}) as stream:
            assert stream.status_code == 200
    output = stop(json_node)

    entries = parse_json_lines(log_lines(json_node))
    messages = [e["message"] for e in entries]
    assert any("Uvicorn running on" in m for m in messages), messages
    assert any(e["logger"].startswith("herald.") for e in entries), messages
    assert any("Finished server process" in m for m in messages), messages
    for token in tokens:
        assert token not in output
        assert token.split(".")[-1] not in output  # not even a JWT's signature
    assert not any("GET /events" in m for m in messages), "no access log"


def test_text_log_reads_as_uvicorns() -> None:
    with run_server() as node:
        httpx.get(f"{node.url}/events", params={"topic": "bad topic", "access_token": "text-secret-x"})
        output = stop(node)
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines
    assert not any(line.startswith("{") for line in lines), lines
    assert any(line.startswith("INFO:") and "Uvicorn running on" in line for line in lines), lines
    assert any(line.startswith("INFO:") and "serving on" in line for line in lines), "Herald's own lines show"
    assert "text-secret-x" not in output


def test_unknown_format_refuses_to_start() -> None:
    port = free_port()
    env = launch.node_env(port, extra={"HERALD_LOG_FORMAT": "yaml"})
    done = subprocess.run(
        launch.node_command(), env=env, cwd=launch.ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0
    assert "HERALD_LOG_FORMAT" in done.stderr
    assert "'yaml'" in done.stderr
    assert "text or json" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Uvicorn running" not in done.stderr + done.stdout


def test_format_names() -> None:
    assert logs.log_format(None) == "text"
    assert logs.log_format("text") == "text"
    assert logs.log_format("json") == "json"
    for bad in ("", "JSON", " json", "yaml", "logfmt"):
        with pytest.raises(logs.LogFormatError, match="HERALD_LOG_FORMAT"):
            logs.log_format(bad)


# The process-wide set-up (what a node runs first), in a process of its own: a test must not rewire pytest's logging.
CONFIGURED = """
import logging, sys, warnings
from api.node import logs
logs.configure(sys.argv[1])
log = logging.getLogger("herald.hub")
log.info("slow client cut off", extra={"buffered": 1024, "topics": ["a", "b"], "why": "too slow"})
log.warning("auth failure for %s", "/events?topic=x&access_token=ARG-SECRET")
logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:1")
logging.getLogger("uvicorn.access").info("GET /events?access_token=ACCESS-SECRET 200")
logging.getLogger("some.library").info("chatter nobody acts on")
logging.getLogger("some.library").warning("a library's warning")
warnings.warn("a Python warning")
try:
    raise RuntimeError("Authorization: Bearer EXC-SECRET")
except RuntimeError:
    logging.getLogger("herald.redis").exception("redis feed failed")
"""


def run_configured(fmt: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CONFIGURED, fmt], cwd=launch.ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout == ""
    return done.stderr


def test_json_config_covers_every_logger_keeps_extras_and_redacts() -> None:
    output = run_configured("json")
    entries = parse_json_lines(output.splitlines())
    by_message = {e["message"]: e for e in entries}
    cut = by_message["slow client cut off"]
    assert (cut["logger"], cut["level"], cut["buffered"], cut["topics"], cut["why"]) == (
        "herald.hub",
        "INFO",
        1024,
        ["a", "b"],
        "too slow",
    )
    assert by_message["auth failure for /events?topic=x&access_token=[redacted]"]["level"] == "WARNING"
    assert "Uvicorn running on http://127.0.0.1:1" in by_message
    assert "a library's warning" in by_message
    assert "chatter nobody acts on" not in by_message  # other libraries: WARNING and up
    assert not any("ACCESS-SECRET" in m for m in by_message), "uvicorn's access log stays off"
    assert any(e["logger"] == "py.warnings" and "a Python warning" in e["message"] for e in entries)
    failed = by_message["redis feed failed"]
    assert failed["level"] == "ERROR"
    assert "RuntimeError: Authorization: Bearer [redacted]" in failed["exception"]
    for secret in ("ARG-SECRET", "EXC-SECRET", "ACCESS-SECRET"):
        assert secret not in output


def test_text_config_keeps_extras_and_redacts() -> None:
    output = run_configured("text")
    lines = output.splitlines()
    assert 'INFO:     slow client cut off buffered=1024 topics=["a","b"] why="too slow"' in lines
    assert "WARNING:  auth failure for /events?topic=x&access_token=[redacted]" in lines
    assert "INFO:     Uvicorn running on http://127.0.0.1:1" in lines
    assert "ERROR:    redis feed failed" in lines
    assert "RuntimeError: Authorization: Bearer [redacted]" in lines
    for secret in ("ARG-SECRET", "EXC-SECRET", "ACCESS-SECRET"):
        assert secret not in output


def format_one(formatter: logging.Formatter, message: str, *args: object, **extra: Any) -> str:
    """``message`` logged through a handler like a node's (redaction, then ``formatter``); what it wrote."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactSecrets())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"herald.test-{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning(message, *args, extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_redaction_of_every_token_shape() -> None:
    jwt = mint(SECRET, subscribe=["**"], ttl=600)
    cases = {
        "/events?topic=a&access_token=Q1&topic=b": "/events?topic=a&access_token=[redacted]&topic=b",
        "Cookie: herald_token=C1; other=1": "Cookie: herald_token=[redacted]; other=1",
        "authorization: bearer B1": "authorization: bearer [redacted]",
        '{"access_token": "J1", "n": 1}': '{"access_token": "[redacted]", "n": 1}',
        f"token {jwt} refused": "token [redacted] refused",
        "redis://herald:pw-1@127.0.0.1:6379/0": "redis://herald:[redacted]@127.0.0.1:6379/0",
        "tokens=5 topic=chat http://127.0.0.1:8000/x": "tokens=5 topic=chat http://127.0.0.1:8000/x",  # these stay
    }
    for text, expected in cases.items():
        assert logs.redact(text) == expected


def test_redaction_reaches_arguments_extras_and_nested_values() -> None:
    line = format_one(
        logs.JsonFormatter(),
        "refused %s",
        "Bearer ARG1",
        url="/events?access_token=EXTRA1",
        nested={"headers": ["Authorization: Bearer NESTED1"], "n": 2},
        message_count=3,
    )
    entry = json.loads(line)
    assert entry["message"] == "refused Bearer [redacted]"
    assert entry["url"] == "/events?access_token=[redacted]"
    assert entry["nested"] == {"headers": ["Authorization: Bearer [redacted]"], "n": 2}
    assert entry["message_count"] == 3
    for secret in ("ARG1", "EXTRA1", "NESTED1"):
        assert secret not in line


def test_arguments_that_do_not_fit_the_message_still_log() -> None:
    entry = json.loads(format_one(logs.JsonFormatter(), "two %s %s", "access_token=ONE"))
    assert "ONE" not in entry["message"]
    assert entry["message"].startswith("two %s %s")


def test_json_extra_named_like_a_core_field_is_kept_aside() -> None:
    entry = json.loads(format_one(logs.JsonFormatter(), "hello", level="custom", time=3))
    assert (entry["level"], entry["level_"], entry["time_"], entry["message"]) == ("WARNING", "custom", 3, "hello")


def test_uvicorns_coloured_message_is_redacted_too() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactSecrets())
    handler.setFormatter(logs.TextFormatter(use_colors=True))
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "GET %s", ("/?access_token=COLOR1",), None)
    record.color_message = "GET \x1b[1m%s\x1b[0m"
    handler.handle(record)
    assert "COLOR1" not in stream.getvalue()
    assert "access_token=[redacted]" in stream.getvalue()
