"""The load tool's parts, without a server: histogram, wire parsing, per-subscriber accounting, options."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.loadtest.config import LoadConfig, check_targets, from_args
from workers.loadtest.histogram import Histogram, bucket_bounds, bucket_of
from workers.loadtest.publisher import Ledger, lanes_for
from workers.loadtest.subscriber import Recorder, Subscriber
from workers.loadtest.wire import ChunkedDecoder, last_field, parse_head, payload
from workers.loadtest.worker import MachineCpu

# -- histogram ---------------------------------------------------------------------------


def test_buckets_are_contiguous_and_narrow() -> None:
    previous_high = -1
    for index in range(bucket_of(10**12) + 1):
        low, high = bucket_bounds(index)
        assert low == previous_high + 1
        assert bucket_of(low) == index
        assert bucket_of(high) == index
        assert high - low <= max(0, low / 128)
        previous_high = high


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=500), st.sampled_from([50, 90, 99]))
def test_percentiles_are_within_a_bucket_of_the_exact_value(values: list[int], q: int) -> None:
    histogram = Histogram()
    histogram.record_many(values)
    exact = sorted(values)[max(0, -(-q * len(values) // 100) - 1)]
    got = histogram.percentile(q)
    assert exact <= got <= max(exact, bucket_bounds(bucket_of(exact))[1])
    assert histogram.max == max(values)
    assert histogram.count == len(values)


def test_merging_equals_recording_everything_in_one() -> None:
    rng = random.Random(7)
    values = [int(rng.expovariate(1 / 5000)) for _ in range(5000)]
    whole, left, right = Histogram(), Histogram(), Histogram()
    whole.record_many(values)
    left.record_many(values[:1234])
    right.record_many(values[1234:])
    left.merge(Histogram.from_json(right.to_json()))
    assert left.counts == whole.counts
    assert (left.count, left.total, left.max) == (whole.count, whole.total, whole.max)
    assert left.cumulative()[-1] == (whole.max, 1.0)


# -- wire --------------------------------------------------------------------------------


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=20), st.data())
def test_chunked_decoding_survives_any_split(chunks: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks if c) + b"0\r\n\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = ChunkedDecoder()
    body = b"".join(decoder.feed(wire[a:b]) for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True))
    assert body == b"".join(chunks)
    assert decoder.done


def test_response_head_and_fields() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Node-Id: node-1")
    assert (head.status, head.chunked, head.headers["x-node-id"]) == (200, True, "node-1")
    with pytest.raises(ValueError, match="not an HTTP response"):
        parse_head(b"SSH-2.0-OpenSSH")
    block = b"retry: 2000\nid: 5\n\nid: 7\nevent: x\ndata: 1 2 3\n\n"
    assert last_field(block, b"id:") == b"7"
    assert last_field(block, b"retry:") == b"2000"
    assert last_field(block, b"event:") == b"x"
    assert last_field(b"data: 1\n\n", b"id:") is None


def test_payload_has_its_size_and_fields() -> None:
    data = payload(3, 41, 1_700_000_000_000_000_000, 100)
    assert len(data) == 100
    assert data.split(" ")[:3] == ["3", "41", "1700000000000000000"]
    assert payload(3, 41, 1, 0) == "3 41 1 "  # never shorter than its fields


# -- a subscriber's accounting ----------------------------------------------------------------


def _frames(*events: tuple[int, int]) -> bytes:
    return b"".join(f"id: {seq}\ndata: {payload(topic, seq, 0, 20)}\n\n".encode() for topic, seq in events)


def _subscriber(topics: list[int]) -> Subscriber:
    return Subscriber(0, "127.0.0.1:1", "/events", topics, Recorder())


def test_a_gap_filled_later_is_out_of_order_and_a_repeat_is_a_duplicate() -> None:
    sub = _subscriber([0, 1])
    sub.on_block(_frames((0, 1), (0, 2), (0, 5), (1, 1)), 10**12)
    sub.on_block(_frames((0, 3), (0, 2), (1, 1), (0, 6)), 10**12)
    assert (sub.delivered, sub.out_of_order, sub.duplicated) == (6, 1, 2)
    assert sub.last_id == "6"
    # Published: topic 0 up to 8, topic 1 up to 2. Missing: 0/4, 0/7, 0/8 and 1/2.
    assert sub.lost({0: 8, 1: 2}, {}) == 4
    # What the server refused (or never confirmed) is not lost.
    assert sub.lost({0: 8, 1: 2}, {0: {4, 8}, 1: {2}}) == 1
    assert not sub.caught_up({0: 8, 1: 1})
    assert sub.caught_up({0: 6, 1: 1})


def test_events_of_topics_not_asked_for_are_counted_apart() -> None:
    sub = _subscriber([0])
    sub.on_block(_frames((0, 1), (9, 1)), 10**12)
    assert (sub.delivered, sub.unknown) == (1, 1)


def test_resets_are_counted_by_reason() -> None:
    sub = _subscriber([0])
    sub.on_block(b'id: 9\nevent: reset\ndata: {"reason":"expired","topics":["a"]}\n\n' + _frames((0, 1)), 10**12)
    assert sub.resets == 1
    assert sub.recorder.reset_reasons == {"expired": 1}
    assert sub.delivered == 1


def test_latency_is_recorded_per_node_and_second() -> None:
    recorder = Recorder()
    recorder.t0_ns = 0
    sub = Subscriber(0, "127.0.0.1:1", "/events", [0], recorder)
    sub.node = "node-a"
    sent = 5 * 10**9
    sub.on_block(f"id: 1\ndata: {payload(0, 1, sent, 0)}\n\n".encode(), sent + 3_000_000)
    buckets = recorder.take_buckets()
    assert list(buckets) == [("node-a", 5)]
    assert buckets["node-a", 5].max == 3000  # µs


def test_ledger_knows_what_was_accepted() -> None:
    ledger = Ledger(topics=2)
    items = [(0, ledger.take(0)), (0, ledger.take(0)), (1, ledger.take(1))]
    ledger.ok(items[:2], 0.001)
    ledger.give_up(items[2:], refused=True)
    assert ledger.last() == {0: 2, 1: 1}
    assert ledger.last_accepted() == {0: 2}
    assert (ledger.accepted, ledger.refused) == (2, 1)
    assert lanes_for(5, 2) == [[0, 2, 4], [1, 3]]
    assert lanes_for(1, 4) == [[0]]


# -- options -----------------------------------------------------------------------------


def test_subscribers_spread_over_topics_and_targets() -> None:
    config = LoadConfig(subscribers=4, topics=3, per_conn=2)
    assert [config.topics_of(i) for i in range(4)] == [[0, 1], [2, 0], [1, 2], [0, 1]]
    assert from_args(["--subscribers", "7", "--topics", "each"]).topics == 7


@pytest.mark.parametrize("target", ["http://10.1.2.3:8080", "http://192.0.2.1", "http://[2001:db8::1]:80"])
def test_a_remote_target_is_refused_unless_allowed(target: str) -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        check_targets(LoadConfig(targets=[target]))
    check_targets(LoadConfig(targets=[target], allow_remote=True))


def test_loopback_targets_are_accepted() -> None:
    check_targets(LoadConfig(targets=["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:2"]))
    with pytest.raises(ValueError, match="--allow-remote"):
        check_targets(LoadConfig(publish="redis", redis_url="redis://10.0.0.1:6379/0"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "http://10.1.2.3:8080"],
        ["--target", "ftp://127.0.0.1"],
        ["--target", "http://127.0.0.1:8080/events"],
        ["--rate", "0"],
        ["--topics", "none"],
        ["--procs", "0"],
        ["--publish", "redis"],
        ["--restart-node-after", "1"],
    ],
)
def test_bad_options_exit_with_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        from_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_machine_cpu_is_a_share_of_all_cpus() -> None:
    meter = MachineCpu()
    sum(i * i for i in range(200_000))  # some work, so that time passes on the CPU counters
    busy = meter.take()
    assert busy is None or 0.0 <= busy <= 1.0
