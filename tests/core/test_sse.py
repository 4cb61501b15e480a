"""Property tests of the SSE wire encoding (api/core/sse.py) against a spec parser.

Every frame Herald sends is parsed by :class:`tests.sse_parser.SSEParser`, a
transcription of the WHATWG "event stream interpretation" algorithm, fed the
bytes whole, one byte at a time and in hypothesis-chosen chunks (so splits
fall inside multi-byte UTF-8 sequences and between the CR and LF of a CRLF).
The parser itself is pinned down first by the spec's own examples.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.core.sse import HEARTBEAT, encode_data, event_frame, preamble, reset_frame
from api.models import EVENT_TYPE_PATTERN, RESERVED_EVENT_TYPES
from tests.sse_parser import SSEEvent, SSEParser

# --- helpers -----------------------------------------------------------------


def parse(chunks: Iterable[bytes], parser: SSEParser | None = None) -> tuple[list[SSEEvent], SSEParser]:
    """Feed ``chunks`` in order; return the dispatched events and the parser (for its state)."""
    parser = SSEParser() if parser is None else parser
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser


def bytewise(blob: bytes) -> list[bytes]:
    """Every possible split at once: one byte per chunk."""
    return [blob[i : i + 1] for i in range(len(blob))]


def split_at(blob: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunked(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    """``blob`` cut at hypothesis-chosen positions (empty chunks included)."""
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(blob)), max_size=12))
    return split_at(blob, cuts)


def all_chunkings(blob: bytes, data: st.DataObject) -> list[list[bytes]]:
    return [[blob], bytewise(blob), data.draw(chunked(blob), label="chunks")]


def normalise(data: str) -> str:
    """What a conforming client sees of a payload: CRLF and lone CR become LF."""
    return data.replace("\r\n", "\n").replace("\r", "\n")


# --- strategies --------------------------------------------------------------

# Characters and fragments that matter to a line-based format, mixed densely into
# ordinary text: SSE line breaks, characters other line splitters treat as breaks
# (str.splitlines would split at VT, FF, FS-US, NEL, LS, PS), NUL, a BOM, field
# syntax, and multi-byte UTF-8 (2, 3 and 4 bytes).
_SPECIALS = [
    "\r",
    "\n",
    "\r\n",
    "\n\r",
    "\r\r",
    "\n\n",
    "\0",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
    "\ufeff",
    ":",
    " ",
    "data: ",
    "data:",
    "data",
    "id: 666",
    "id",
    "event: evil",
    "retry: 1",
    ": comment",
    "é",
    "€",
    "😀",
]

payloads: st.SearchStrategy[str] = st.one_of(
    st.text(),
    st.lists(st.one_of(st.text(max_size=4), st.sampled_from(_SPECIALS)), max_size=20).map("".join),
)

_INJECTIONS = [
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\r",
    "\r\n\r\n",
    "id: 666",
    "id:666",
    "id",
    "event: evil",
    "event:reset",
    "retry: 1",
    "retry:1",
    "data: x",
    "data",
    ": c",
    "\0",
    "\ufeff",
    "x",
]

# Hostile payloads only: line breaks and field lines, in any arrangement.
injections: st.SearchStrategy[str] = st.lists(st.sampled_from(_INJECTIONS), min_size=1, max_size=16).map("".join)

event_ids: st.SearchStrategy[int] = st.integers(min_value=0, max_value=2**63 - 1)
positions: st.SearchStrategy[int | None] = st.none() | event_ids

event_types: st.SearchStrategy[str] = st.from_regex(EVENT_TYPE_PATTERN, fullmatch=True).filter(
    lambda t: t not in RESERVED_EVENT_TYPES
)
optional_types: st.SearchStrategy[str | None] = st.none() | event_types

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


# --- the parser against the spec ---------------------------------------------


def test_parser_spec_example_multiline_data() -> None:
    events, _ = parse([b"data: YHOO\ndata: +2\ndata: 10\n\n"])
    assert events == [SSEEvent("message", "YHOO\n+2\n10", "")]


def test_parser_spec_example_comments_and_ids() -> None:
    stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n"
    events, parser = parse([stream])
    assert events == [SSEEvent("message", "first event", "1"), SSEEvent("message", "second event", "")]
    assert parser.comments == 1
    # The last block has no blank line after it: the end of the stream does not dispatch it.
    events, _ = parse([stream, b"\n"])
    assert events[-1] == SSEEvent("message", " third event", "")


def test_parser_spec_example_empty_data() -> None:
    # "The first block fires events with the data set to the empty string ... The middle
    # block fires an event with the data set to a single newline character."
    events, _ = parse([b"data\n\ndata\ndata\n\ndata:"])
    assert events == [SSEEvent("message", "", ""), SSEEvent("message", "\n", "")]


def test_parser_spec_example_one_space_dropped() -> None:
    events, _ = parse([b"data:test\n\ndata: test\n\n"])
    assert events == [SSEEvent("message", "test", "")] * 2


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_parser_line_endings(eol: bytes) -> None:
    lines = [b"id: 5", b"event: tick", b"data: a", b"data: b", b"", b"data: c", b""]
    stream = eol.join(lines) + eol
    expected = [SSEEvent("tick", "a\nb", "5"), SSEEvent("message", "c", "5")]
    for chunks in ([stream], bytewise(stream)):
        events, _ = parse(chunks)
        assert events == expected


def test_parser_mixed_line_endings() -> None:
    events, _ = parse([b"data: a\rdata: b\r\ndata: c\n\r\n"])
    assert events == [SSEEvent("message", "a\nb\nc", "")]


def test_parser_crlf_split_across_chunks_is_one_line_break() -> None:
    # Counted twice, the split CRLF would end the block early: events "a" and "b".
    events, _ = parse([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent("message", "a\nb", "")]


def test_parser_field_without_colon() -> None:
    events, parser = parse([b"id: 3\nevent: x\nevent\ndata\n\nid\n\n"])
    # "event" with no colon sets an empty type (so "message"); "id" alone clears the id.
    assert events == [SSEEvent("message", "", "3")]
    assert parser.last_event_id == ""


def test_parser_value_keeps_later_colons_and_spaces() -> None:
    events, _ = parse([b"data:  a: b :c\n\n"])
    assert events == [SSEEvent("message", " a: b :c", "")]


def test_parser_ignores_unknown_and_miscased_fields() -> None:
    events, parser = parse([b"Data: x\nfoo: bar\nID: 9\nid : 9\nretry : 5\n\ndata: y\n\n"])
    assert events == [SSEEvent("message", "y", "")]
    assert parser.retry is None


@pytest.mark.parametrize("chunks", [[b"\xef\xbb\xbfdata: x\n\n"], bytewise(b"\xef\xbb\xbfdata: x\n\n")])
def test_parser_strips_leading_bom(chunks: list[bytes]) -> None:
    events, _ = parse(chunks)
    assert events == [SSEEvent("message", "x", "")]


def test_parser_strips_only_one_leading_bom() -> None:
    # The second BOM is part of the field name "\ufeffdata", an unknown field.
    events, _ = parse(["\ufeff\ufeffdata: x\n\n".encode()])
    assert events == []


def test_parser_keeps_bom_inside_the_stream() -> None:
    events, _ = parse(["data: \ufeffx\n\n".encode()])
    assert events == [SSEEvent("message", "\ufeffx", "")]


def test_parser_ignores_id_with_nul() -> None:
    events, parser = parse([b"id: 1\n\nid: 2\x003\ndata: x\n\n"])
    assert events == [SSEEvent("message", "x", "1")]
    assert parser.last_event_id == "1"


def test_parser_keeps_nul_in_data() -> None:
    events, _ = parse([b"data: a\x00b\n\n"])
    assert events == [SSEEvent("message", "a\0b", "")]


@pytest.mark.parametrize(
    ("line", "retry"),
    [
        (b"retry: 1500", 1500),
        (b"retry:0", 0),
        (b"retry: 15x", None),
        (b"retry: -1", None),
        (b"retry: 1.5", None),
        (b"retry:  5", None),
        (b"retry:", None),
        (b"retry", None),
    ],
)
def test_parser_retry_takes_ascii_digits_only(line: bytes, retry: int | None) -> None:
    events, parser = parse([line + b"\n\n"])
    assert events == []
    assert parser.retry == retry


def test_parser_event_type_resets_after_each_block() -> None:
    events, _ = parse([b"event: a\ndata: 1\n\ndata: 2\n\nevent: b\n\ndata: 3\n\n"])
    assert [e.type for e in events] == ["a", "message", "message"]


def test_parser_replaces_invalid_utf8() -> None:
    events, _ = parse([b"data: a\xffb\n\n"])
    assert events == [SSEEvent("message", "a\ufffdb", "")]


# --- 1. round trip -----------------------------------------------------------


@settings(max_examples=300)
@given(event_id=event_ids, data=payloads, event_type=optional_types, draw=st.data())
def test_event_frame_round_trip(event_id: int, data: str, event_type: str | None, draw: st.DataObject) -> None:
    frame = event_frame(event_id, data, event_type)
    expected = [SSEEvent(event_type or "message", normalise(data), str(event_id))]
    for chunks in all_chunkings(frame, draw):
        events, parser = parse(chunks)
        assert events == expected
        assert parser.last_event_id == str(event_id)
        assert parser.retry is None
        assert parser.comments == 0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("a\r\nb\rc\nd\n\re", "a\nb\nc\nd\n\ne"),
        ("\r", "\n"),
        ("\r\n", "\n"),
        ("\n\r", "\n\n"),
        ("€😀\r\n\0", "€😀\n\0"),
        ("\x0b\x0c\x1c\x85\u2028\u2029", "\x0b\x0c\x1c\x85\u2028\u2029"),
    ],
)
def test_event_frame_round_trip_examples(data: str, expected: str) -> None:
    frame = event_frame(3, data, "x:y")
    for chunks in ([frame], bytewise(frame)):
        events, _ = parse(chunks)
        assert events == [SSEEvent("x:y", expected, "3")]


def test_empty_data_is_one_event_with_empty_data() -> None:
    # "data: \n\n" puts a LF in the data buffer, so the spec dispatches an event whose
    # data is "" (its own example: "data\n\n"). An empty payload is not lost.
    events, _ = parse([event_frame(4, "")])
    assert events == [SSEEvent("message", "", "4")]


@given(data=payloads, event_type=optional_types, previous=positions, draw=st.data())
def test_event_frame_without_id_keeps_last_event_id(
    data: str, event_type: str | None, previous: int | None, draw: st.DataObject
) -> None:
    before = b"" if previous is None else f"id: {previous}\n\n".encode()
    last = "" if previous is None else str(previous)
    frame = event_frame(None, data, event_type)
    assert not frame.startswith(b"id")
    for chunks in all_chunkings(before + frame, draw):
        events, parser = parse(chunks)
        assert events == [SSEEvent(event_type or "message", normalise(data), last)]
        assert parser.last_event_id == last


@given(data=payloads)
def test_frame_lines_are_the_payload_lines(data: str) -> None:
    # Only CR, LF and CRLF split the payload (not VT, FF, FS, NEL, LS, PS, which
    # str.splitlines would split at), and no CR reaches the wire.
    frame = event_frame(1, data).decode()
    assert "\r" not in frame
    lines = frame.split("\n")
    assert lines[0] == "id: 1"
    assert lines[-2:] == ["", ""]
    assert all(line.startswith("data: ") for line in lines[1:-2])
    assert "\n".join(line.removeprefix("data: ") for line in lines[1:-2]) == normalise(data)


# --- 2. injection ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "\nid: 666\nevent: evil\nretry: 1\n\ndata: x",
        "\rid: 666\revent: evil\rretry: 1\r\rdata: x",
        "\r\nid: 666\r\nevent: evil\r\nretry: 1\r\n\r\ndata: x",
        "x\n\nid: 666\n\n",
        "\n\n\n",
        "\r\r",
        "\r\n\r\n",
        "\n\r",
        "id: 666",
        "event: evil",
        "retry: 1",
        ": comment\n\nid:666\nevent:reset\n\n",
        "\0\nid: 6\0",
        "\x85id: 666\u2028event: evil\u2029retry: 1\x0b\x0c\x1c\n",
        "\n\ufeffid: 666\n\n",
        "a\r",
        "\r\n\ndata: x\n\n",
    ],
)
def test_injection_examples(data: str) -> None:
    frame = event_frame(1, data, "ok")
    for chunks in ([frame], bytewise(frame)):
        events, parser = parse(chunks)
        assert events == [SSEEvent("ok", normalise(data), "1")]
        assert parser.last_event_id == "1"
        assert parser.retry is None
        assert parser.comments == 0


@settings(max_examples=200)
@given(
    data=st.one_of(injections, payloads),
    event_id=st.none() | event_ids,
    event_type=optional_types,
    draw=st.data(),
)
def test_injection_property(data: str, event_id: int | None, event_type: str | None, draw: st.DataObject) -> None:
    # A frame must leave the parser clean: a following, ordinary frame still parses
    # exactly (no leftover type, data, or partial line).
    last = "" if event_id is None else str(event_id)
    stream = event_frame(event_id, data, event_type) + event_frame(None, "after")
    expected = [SSEEvent(event_type or "message", normalise(data), last), SSEEvent("message", "after", last)]
    for chunks in all_chunkings(stream, draw):
        events, parser = parse(chunks)
        assert events == expected
        assert parser.last_event_id == last
        assert parser.retry is None
        assert parser.comments == 0


# --- 3. concatenated frames --------------------------------------------------


frames_specs = st.lists(st.tuples(positions, payloads, optional_types, st.booleans()), max_size=8)


@given(specs=frames_specs, draw=st.data())
def test_concatenated_frames_parse_in_order(
    specs: Sequence[tuple[int | None, str, str | None, bool]], draw: st.DataObject
) -> None:
    stream = b""
    expected: list[SSEEvent] = []
    last = ""
    for event_id, data, event_type, heartbeat_after in specs:
        stream += event_frame(event_id, data, event_type)
        if heartbeat_after:
            stream += HEARTBEAT
        if event_id is not None:
            last = str(event_id)
        expected.append(SSEEvent(event_type or "message", normalise(data), last))
    for chunks in all_chunkings(stream, draw):
        events, parser = parse(chunks)
        assert events == expected
        assert parser.last_event_id == last
        assert parser.retry is None
        assert parser.comments == sum(spec[3] for spec in specs)


# --- 4. encode_data ----------------------------------------------------------


@given(st.text())
def test_encode_data_passes_strings_unchanged(value: str) -> None:
    assert encode_data(value) == value


@given(json_values.filter(lambda v: not isinstance(v, str)))
def test_encode_data_json_round_trip(value: Any) -> None:
    text = encode_data(value)
    assert json.loads(text) == value
    # And through the wire: JSON escapes CR and LF, so the payload arrives verbatim.
    events, _ = parse([event_frame(1, text)])
    assert len(events) == 1
    assert events[0].data == text
    assert json.loads(events[0].data) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (0, "0"),
        (-1.5, "-1.5"),
        ([], "[]"),
        ({}, "{}"),
        ({"a": [1, 2.5, None, True, False], "b": {"c": "d"}}, '{"a":[1,2.5,null,true,false],"b":{"c":"d"}}'),
        (["é", "€", "😀", "\u2028"], '["é","€","😀","\u2028"]'),
        (["line\r\nbreak"], '["line\\r\\nbreak"]'),
    ],
)
def test_encode_data_is_compact_and_not_ascii_escaped(value: Any, text: str) -> None:
    assert encode_data(value) == text


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, [math.nan], {"a": math.inf}, {"a": [1, {"b": -math.inf}]}]
)
def test_encode_data_rejects_nan_and_infinity(value: Any) -> None:
    with pytest.raises(ValueError, match="JSON"):
        encode_data(value)


# --- 5. preamble -------------------------------------------------------------


@given(retry_ms=st.integers(min_value=0, max_value=10**12), position=positions, draw=st.data())
def test_preamble(retry_ms: int, position: int | None, draw: st.DataObject) -> None:
    last = "" if position is None else str(position)
    blob = preamble(retry_ms, position)
    for chunks in all_chunkings(blob, draw):
        events, parser = parse(chunks)
        assert events == []
        assert parser.retry == retry_ms
        assert parser.last_event_id == last
    # The position is the id of the first event that carries none of its own.
    events, parser = parse([blob, event_frame(None, "x"), HEARTBEAT])
    assert events == [SSEEvent("message", "x", last)]
    assert parser.last_event_id == last


# --- 6. reset_frame ----------------------------------------------------------


@given(
    reason=st.text(),
    topics=st.lists(st.text(), max_size=5).map(tuple),
    position=positions,
    draw=st.data(),
)
def test_reset_frame(reason: str, topics: tuple[str, ...], position: int | None, draw: st.DataObject) -> None:
    last = "" if position is None else str(position)
    frame = reset_frame(reason, topics, position)
    for chunks in all_chunkings(frame, draw):
        events, parser = parse(chunks)
        assert len(events) == 1
        assert events[0].type == "reset"
        assert events[0].last_event_id == last
        assert json.loads(events[0].data) == {"reason": reason, "topics": list(topics)}
        assert parser.last_event_id == last
        assert parser.retry is None


def test_reset_frame_example() -> None:
    events, _ = parse([reset_frame("gap", ("a", "b/c"), 42)])
    assert events == [SSEEvent("reset", '{"reason":"gap","topics":["a","b/c"]}', "42")]


# --- 7. heartbeat ------------------------------------------------------------


def test_heartbeat_is_a_comment() -> None:
    for chunks in ([HEARTBEAT], bytewise(HEARTBEAT)):
        events, parser = parse(chunks)
        assert events == []
        assert parser.comments == 1
        assert parser.retry is None
        assert parser.last_event_id == ""


def test_heartbeat_keeps_position_and_type() -> None:
    events, parser = parse([preamble(1000, 7), HEARTBEAT, HEARTBEAT, event_frame(None, "x", "t"), HEARTBEAT])
    assert events == [SSEEvent("t", "x", "7")]
    assert parser.comments == 3
    assert parser.retry == 1000
