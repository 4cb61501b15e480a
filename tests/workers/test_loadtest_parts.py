"""The load tool's parts, without a server: histogram, wire parsing, per-subscriber accounting, options."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.auth.selectors import TopicMatcher
from tests.workers.test_loadtest import validate
from workers.loadtest.config import (
    DEFAULT_FAULT_AT,
    DEFAULT_FREEZE_SECONDS,
    TOKEN_MARGIN,
    LoadConfig,
    check_targets,
    from_args,
    parser,
)
from workers.loadtest.faults import KINDS, Fault, inject
from workers.loadtest.histogram import Histogram, bucket_bounds, bucket_of
from workers.loadtest.publisher import Ledger, Pacer, pacers_for
from workers.loadtest.report import render
from workers.loadtest.results import SCHEMA_PATH, Aggregate, build, summary_table
from workers.loadtest.runner import faults_of
from workers.loadtest.subscriber import Recorder, Subscriber
from workers.loadtest.wire import (
    NOT_EVENT_STREAM,
    ChunkedDecoder,
    answer_cause,
    errno_cause,
    get_request,
    is_event_stream,
    last_field,
    parse_head,
    payload,
)
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


def test_loop_lag_mean_negative_when_uvloop_woke_a_sleep_early() -> None:
    """Regression: uvloop's millisecond timers ended a sleep early, the lag sampler
    recorded -4 µs, and the report's mean lag went negative (schema: minimum 0)."""
    histogram = Histogram()
    histogram.record_many([-1000, -4, 0, 3])
    assert histogram.counts[0] == 3
    assert (histogram.count, histogram.total, histogram.max) == (4, 3, 3)
    assert histogram.summary_ms()["mean"] >= 0


@pytest.mark.timeout(10)
async def test_the_lag_sampler_never_records_a_negative_lag() -> None:
    import uvloop

    from workers.loadtest.worker import measure_lag

    class Samples(Histogram):
        def __init__(self) -> None:
            super().__init__()
            self.values: list[int] = []

        def record(self, value: int) -> None:
            self.values.append(value)

    async def sample() -> list[int]:
        samples = Samples()
        task = asyncio.create_task(measure_lag(samples, period=0.0015))
        while len(samples.values) < 300:
            await asyncio.sleep(0.0007)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return samples.values

    values = await asyncio.wait_for(asyncio.to_thread(uvloop.run, sample()), 8)
    assert len(values) >= 300
    assert min(values) >= 0


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


def test_the_settled_latencies_leave_out_the_first_second_of_every_node() -> None:
    aggregate = Aggregate(1)
    warm, settled = Histogram(), Histogram()
    warm.record(60_000)
    settled.record(30_000)
    aggregate.add_buckets([["a", 0, warm.to_json()], ["b", 0, warm.to_json()], ["a", 1, settled.to_json()]])
    aggregate.add_buckets([["b", 7, settled.to_json()]])
    assert aggregate.latency.count == 4
    assert (aggregate.settled().count, aggregate.settled().max) == (2, 30_000)


def test_ledger_knows_what_was_accepted() -> None:
    ledger = Ledger(topics=2)
    items = [(0, ledger.take(0)), (0, ledger.take(0)), (1, ledger.take(1))]
    ledger.ok(items[:2], 0.001)
    ledger.give_up(items[2:], refused=True)
    assert ledger.last() == {0: 2, 1: 1}
    assert ledger.last_accepted() == {0: 2}
    assert (ledger.accepted, ledger.refused) == (2, 1)
    assert pacers_for(5, 2) == [[0, 2, 4], [1, 3]]
    assert pacers_for(1, 4) == [[0]]


class FlakySender:
    """A publish target that fails ``failures`` times (a hung node's timeouts, say), then accepts."""

    warmed = 0

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.keys: list[str] = []

    async def __call__(self, items: list[tuple[int, int]], sent_ns: int, key: str) -> int | str:
        self.keys.append(key)
        if len(self.keys) <= self.failures:
            return "ReadTimeout"
        return 201

    async def warmup(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.timeout(10)
async def test_a_publish_is_retried_with_its_idempotency_key_and_its_whole_wait_recorded() -> None:
    ledger = Ledger(topics=1)
    ledger.t0 = time.monotonic()
    send = FlakySender(failures=2)
    pacer = Pacer(index=0, topics=[0], rate=1, duration=1, batch=1, retry_for=30, run_id="r", seed=1,
                  ledger=ledger, send=send)  # fmt: skip
    await pacer.publish([(0, ledger.take(0))], "r-0-1")
    assert send.keys == ["r-0-1"] * 3  # one key for the request and its retries: nothing is published twice
    assert [ok for _, ok in ledger.outcomes] == [False, False, True]
    [(_, waited)] = ledger.waits
    assert waited >= 0.05 + 0.1  # both retries' back-off: from the first attempt, not the last
    assert ledger.latency.max < waited * 1_000_000  # the request time is the last attempt's alone


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


# -- faults: options, injection, the report ------------------------------------------------


def test_fault_options_parse_into_faults_in_time_order() -> None:
    config = from_args(["--stop-all-nodes-at", "5", "--for", "2.5", "--failover-redis-at", "1"])
    assert (config.stop_all_nodes_at, config.stop_all_for, config.failover_redis_at) == (5, 2.5, 1)
    assert config.has_faults
    faults = faults_of(config)
    assert [(f.kind, f.at, f.restart_after) for f in faults] == [
        ("failover-redis", 1, None),
        ("stop-all-nodes", 5, 2.5),
    ]
    assert [f.kind for f in faults_of(from_args(["--restart-nodes-at", "2"]))] == ["restart-nodes"]
    assert not from_args([]).has_faults
    assert "SIGKILL every node" in parser().format_help()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--for", "2"], "--for needs --stop-all-nodes-at"),
        (["--stop-all-nodes-at", "2"], "needs --for"),
        (["--stop-all-nodes-at", "2", "--for", "-1"], "--for is out of range"),
        (["--restart-nodes-at", "-1"], "--restart-nodes-at is out of range"),
        (["--kill-node-at", "1", "--restart-nodes-at", "2"], "same processes"),
        (["--restart-redis-at", "1", "--failover-redis-at", "2"], "same processes"),
        (["--fault", "freeze", "--kill-node-at", "2"], "--kill-node-at and --freeze-node-at act on the same processes"),
        (["--fault", "freeze-redis", "--restart-redis-at", "2"], "same processes"),
        (["--freeze-node-at", "-1"], "--freeze-node-at is out of range"),
        (["--fault", "freeze", "--freeze-for", "-1"], "--freeze-for is out of range"),
        (["--fault", "kill"], "invalid choice"),
        (["--system", "nchan", "--fault", "freeze"], "local Herald cluster"),
        (["--heartbeat", "0"], "--heartbeat is out of range"),
        (["--silence-timeout", "-1"], "--silence-timeout is out of range"),
        (["--system", "nchan", "--restart-nodes-at", "1"], "local Herald cluster"),
        # What the compiled publisher cannot honour.
        (["--pipeline", "4"], "--pipeline needs --publisher native"),
        (["--publisher", "native", "--system", "nchan", "--per-request", "5"], "nchan takes one event per request"),
        (["--publisher", "native", "--publish", "redis", "--redis-url", "redis://127.0.0.1:1"], "over HTTP"),
        (["--publisher", "native", "--kill-node-at", "1"], "faults need --publisher python"),
    ],
)
def test_bad_fault_and_publisher_options_exit_with_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        from_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_freeze_is_asked_for_as_fault_freeze_or_by_its_own_options() -> None:
    """``--fault freeze`` (the issue's spelling) is ``--freeze-node-at`` at its default time; both name a node
    and a length, and a freeze of Redis goes alongside one of a node."""
    [freeze] = faults_of(from_args(["--fault", "freeze"]))
    assert (freeze.kind, freeze.at, freeze.node, freeze.restart_after) == (
        "freeze-node",
        DEFAULT_FAULT_AT,
        0,
        DEFAULT_FREEZE_SECONDS,
    )
    config = from_args(["--fault", "freeze", "--freeze-node-at", "3", "--freeze-node", "1", "--freeze-for", "12",
                        "--fault", "freeze-redis"])  # fmt: skip
    assert [(f.kind, f.at, f.node, f.restart_after) for f in faults_of(config)] == [
        ("freeze-node", 3, 1, 12),
        ("freeze-redis", DEFAULT_FAULT_AT, 0, 12),
    ]
    assert [f.kind for f in faults_of(from_args(["--freeze-redis-at", "1"]))] == ["freeze-redis"]
    assert config.longest_seconds >= 2 * 12  # the run's token outlives both freezes
    assert "SIGSTOP a node" in parser().format_help()


def test_every_fault_kind_is_in_the_results_schema() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["properties"]["faults"]["items"]["properties"]["kind"]["enum"] == list(KINDS)


def test_the_silence_limit_is_two_heartbeats_of_herald_and_none_for_a_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERALD_HEARTBEAT", raising=False)
    assert from_args([]).silence_timeout == 30  # 2 x the nodes' default heartbeat, 15 s
    assert from_args(["--heartbeat", "2"]).silence_timeout == 4
    assert from_args(["--silence-timeout", "0.5"]).silence_timeout == 0.5
    assert from_args(["--silence-timeout", "0"]).silence_timeout == 0  # never
    assert from_args(["--system", "nchan"]).silence_timeout == 0  # nchan sends no heartbeat by default
    assert from_args(["--system", "nchan", "--silence-timeout", "9"]).silence_timeout == 9
    monkeypatch.setenv("HERALD_HEARTBEAT", "1.5")  # as the nodes have it
    assert (from_args([]).heartbeat, from_args([]).silence_timeout) == (1.5, 3)


class FakeCluster:
    """Records what a fault asked of the cluster, as :class:`ops.cluster.Cluster` would be asked."""

    def __init__(self, nodes: int = 2, sentinel: bool = False) -> None:
        self.node_ports = list(range(nodes))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.sentinel = sentinel
        self.calls: list[str] = []
        self.frozen: asyncio.Event | None = None
        """Set (from the cluster's thread) once something is frozen, when given."""
        self.loop: asyncio.AbstractEventLoop | None = None

    def _froze(self, name: str) -> int:
        self.calls.append(f"freeze {name}")
        if self.frozen is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.frozen.set)
        return 4242

    def freeze_node(self, index: int) -> int:
        return self._froze(f"node-{index}")

    def thaw_node(self, index: int) -> int:
        self.calls.append(f"thaw node-{index}")
        return 4242

    def freeze_redis(self, name: str = "redis") -> int:
        return self._froze(name)

    def thaw_redis(self, name: str = "redis") -> int:
        self.calls.append(f"thaw {name}")
        return 4242

    def kill_node(self, index: int) -> None:
        self.calls.append(f"kill {index}")

    def stop_node(self, index: int, kill: bool = False) -> None:
        self.calls.append(f"{'kill' if kill else 'stop'} {index}")

    def start_node(self, index: int) -> None:
        self.calls.append(f"start {index}")

    def stop_redis(self) -> None:
        self.calls.append("stop redis")

    def start_redis(self) -> None:
        self.calls.append("start redis")

    def restart_nodes(self, on_step: Callable[[str], None] | None = None) -> None:
        assert on_step is not None
        for index in self.node_ports:
            on_step(f"stopped node-{index}")
            on_step(f"node-{index} ready")

    def failover_redis(self) -> str:
        if not self.sentinel:
            raise RuntimeError("failover needs a cluster started with sentinels (--sentinel)")
        return "redis"


async def test_faults_run_their_steps_and_record_them() -> None:
    t0 = time.monotonic()
    rolling, outage, failover, refused = (
        Fault("restart-nodes", 0),
        Fault("stop-all-nodes", 0, restart_after=0.05),
        Fault("failover-redis", 0),
        Fault("failover-redis", 0),
    )
    cluster = FakeCluster(nodes=2)
    await inject(cluster, rolling, t0)
    await inject(cluster, outage, t0)
    await inject(FakeCluster(sentinel=True), failover, t0)
    await inject(FakeCluster(), refused, t0)
    assert [w for w, _ in rolling.done] == ["rolling restart", "stopped node-0", "node-0 ready", "stopped node-1",
                                            "node-1 ready", "rolling restart done"]  # fmt: skip
    assert rolling.ended == rolling.done[-1][1]
    assert cluster.calls == ["kill 0", "kill 1", "start 0", "start 1"]
    steps = [w for w, _ in outage.done]
    assert steps[:2] == ["killed all 2 nodes", "starting all 2 nodes"]
    assert steps[-1] == "all nodes ready"
    assert outage.done[1][1] - outage.done[0][1] >= 0.04  # down for restart_after
    assert [w for w, _ in failover.done] == ["killed redis primary redis"]
    assert failover.error is None
    assert refused.error is not None
    assert "sentinels" in refused.error


async def test_a_freeze_stops_the_process_for_its_time_and_then_thaws_it() -> None:
    t0 = time.monotonic()
    node, redis = Fault("freeze-node", 0, node=1, restart_after=0.05), Fault("freeze-redis", 0, restart_after=0.05)
    cluster = FakeCluster()
    await inject(cluster, node, t0)
    await inject(cluster, redis, t0)
    assert cluster.calls == ["freeze node-1", "thaw node-1", "freeze redis", "thaw redis"]
    assert [w for w, _ in node.done] == ["froze node-1", "thawed node-1"]
    assert [w for w, _ in redis.done] == ["froze redis", "thawed redis"]
    assert node.done[1][1] - node.done[0][1] >= 0.04  # frozen for restart_after
    assert (node.error, node.ended) == (None, node.done[0][1])  # not lasting: its subscribers may be back before


@pytest.mark.timeout(10)
async def test_a_run_that_ends_during_a_freeze_still_thaws_the_process() -> None:
    cluster = FakeCluster()
    cluster.frozen, cluster.loop = asyncio.Event(), asyncio.get_running_loop()
    fault = Fault("freeze-node", 0, restart_after=3600)
    task = asyncio.create_task(inject(cluster, fault, time.monotonic()))
    await cluster.frozen.wait()
    task.cancel()  # as the runner does to a run that failed part-way
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert cluster.calls == ["freeze node-0", "thaw node-0"]


def _result_with(
    fault: Fault | list[Fault],
    subscribers: list[dict[str, Any]],
    t0_ns: int,
    ledger: Ledger | None = None,
    buckets: list[list[Any]] | None = None,
) -> dict[str, Any]:
    """The result of a run with ``fault`` (or several), ``subscribers`` and ``ledger``; ``buckets`` as a worker's."""
    config = LoadConfig(subscribers=len(subscribers), duration=1, rate=1)
    if ledger is None:
        ledger = Ledger(topics=1)
        ledger.ok([(0, ledger.take(0))], 0.001)
    aggregate = Aggregate(1)
    aggregate.add_buckets(buckets or [])
    aggregate.results.append(
        {"subscribers": subscribers, "buckets": [], "connect_time": Histogram().to_json(), "lag": Histogram().to_json(),
         "connects": {"node-0": 3, "127.0.0.1:8080": 0}, "connect_errors": {"502 from the proxy": 2, "timeout": 1},
         "drops": {"eof": 3}, "reset_reasons": {}, "told_to_retry": 4, "fd_exhausted": False, "last_delivery_ns": 0}
    )  # fmt: skip
    faults = fault if isinstance(fault, list) else [fault]
    return build(config, ledger, aggregate, faults, started_at="2026-01-01T00:00:00+00:00", t0_ns=t0_ns,
                 publish_seconds=1.0, publisher_cpu=[], machine_cpu=[], open_files=(1024, 1024))  # fmt: skip


def _sub(index: int, gaps: list[list[float]], down_at: float | None = None) -> dict[str, Any]:
    return {"index": index, "node": "node-0", "topics": 1, "connected": True, "late": False, "delivered": 1,
            "expected": 1, "lost": 0, "duplicated": 0, "out_of_order": 0, "unknown": 0,
            "reconnects": len(gaps), "resets": 0, "gaps": gaps, "down_at": down_at}  # fmt: skip


def test_a_rolling_restart_is_over_when_it_ends_and_everyone_is_back() -> None:
    zero = 1000.0
    fault = Fault("restart-nodes", 2.0, began=2.0)
    fault.done = [("rolling restart", 2.0), ("stopped node-0", 2.2), ("node-0 ready", 3.0), ("stopped node-1", 4.0),
                  ("node-1 ready", 5.0), ("rolling restart done", 6.0)]  # fmt: skip
    # Subscriber 0 was moved twice; 1 once; 2 never. The last one back came back before the restart ended.
    subscribers = [_sub(0, [[zero + 2.2, zero + 2.3], [zero + 4.0, zero + 4.1]]), _sub(1, [[zero + 4.0, zero + 4.4]]),
                   _sub(2, [])]  # fmt: skip
    result = _result_with(fault, subscribers, int(zero * 1e9))
    validate(result)
    [report] = result["faults"]
    assert (report["subscribers_disconnected"], report["disconnections"]) == (2, 3)
    assert report["subscribers_back_after_s"] == 4.0  # the end of the restart, not the last reconnect
    assert report["ended_s"] == 6.0
    assert result["connections"]["told_to_retry"] == 4
    assert [n["node"] for n in result["nodes"]] == []  # no deliveries: and the proxy's "retry" is no node
    table = summary_table(result)
    assert "fault         restart-nodes at 2.0 s: rolling restart at 2.0 s, stopped node-0 at 2.2 s" in table
    assert "2 subscribers cut off (3 times), all back after 4.0 s" in table
    assert "not streamed  502 from the proxy 2, timeout 1; told to retry 4" in table
    assert "all back (restart-nodes, 4.0 s)" in render(result)

    # A subscriber still down at the end: nobody is "all back".
    still_down = _result_with(fault, [_sub(0, [], down_at=zero + 4.0)], int(zero * 1e9))["faults"][0]
    assert (still_down["subscribers_not_back"], still_down["subscribers_back_after_s"]) == (1, None)
    failed = Fault("failover-redis", 1.0, began=1.0, error="RuntimeError: no sentinels")
    failed.done = [("failover-redis failed", 1.0)]
    verdict = _result_with(failed, [_sub(0, [])], int(zero * 1e9))["verdict"]
    assert verdict == {
        "pass": False,
        "reasons": ["fault failover-redis was not carried out: RuntimeError: no sentinels"],
    }


def _ledger(outcomes: list[tuple[float, bool]], waits: list[tuple[float, float]]) -> Ledger:
    """A ledger of one accepted event and the given request outcomes and publish waits (seconds into the run)."""
    ledger = Ledger(topics=1)
    ledger.ok([(0, ledger.take(0))], 0.001)
    ledger.outcomes, ledger.waits = outcomes, waits
    return ledger


def _latency(second: int, *ms: float) -> list[Any]:
    """A worker's latency bucket: deliveries in ``second`` of the run, ``ms`` after their publish."""
    histogram = Histogram()
    for value in ms:
        histogram.record(int(value * 1000))
    return ["node-1", second, histogram.to_json()]


def test_regression_a_later_faults_publish_errors_are_not_counted_for_an_earlier_fault() -> None:
    """A node kill at 10 s (1 publish error) and a Redis failover at 35 s (24): the kill's report said
    "publishing back after 27.6 s", the failover's recovery; each fault's figures are its window's only."""
    zero = 1000.0
    kill = Fault("kill-node", 10.0, began=10.0, done=[("killed node-0", 10.0)])
    failover = Fault("failover-redis", 35.0, began=35.0, done=[("killed redis primary redis", 35.0)])
    failures = [35.1 + 0.1 * i for i in range(24)]  # 35.1 to 37.4
    outcomes = [(9.0, True), (10.2, False), (10.6, True), (20.0, True), *((t, False) for t in failures), (37.6, True)]
    waits = [(10.6, 0.5), (37.6, 2.5)]
    buckets = [_latency(10, 3, 900), _latency(36, 2400), _latency(50, 7)]
    result = _result_with([kill, failover], [_sub(0, [])], int(zero * 1e9), _ledger(outcomes, waits), buckets)
    validate(result)
    by_kind = {report["kind"]: report for report in result["faults"]}
    # The windows are the faults' times', not their order's.
    shuffled = _result_with([failover, kill], [_sub(0, [])], int(zero * 1e9), _ledger(outcomes, waits), buckets)
    assert shuffled["faults"] == result["faults"][::-1]
    assert (by_kind["kill-node"]["publish_errors"], by_kind["kill-node"]["publishing_back_after_s"]) == (1, 0.6)
    assert (by_kind["failover-redis"]["publish_errors"], by_kind["failover-redis"]["publishing_back_after_s"]) == (
        24,
        2.6,
    )
    assert (by_kind["kill-node"]["longest_publish_wait_s"], by_kind["failover-redis"]["longest_publish_wait_s"]) == (
        0.5,
        2.5,
    )
    assert (by_kind["kill-node"]["worst_delay_ms"], by_kind["failover-redis"]["worst_delay_ms"]) == (900, 2400)
    table = summary_table(result)
    assert "1 publish errors, publishing back after 0.6 s" in table
    assert "24 publish errors, publishing back after 2.6 s" in table
    assert "27.6" not in table


def test_a_freeze_reports_the_worst_delay_the_longest_publish_wait_and_when_all_were_back() -> None:
    """A node frozen at 5 s for 40 s: its subscribers found it silent 30 s on and moved (back 31.2 s after the
    freeze), events waited for them up to 31 s, and a publish to the hung node waited 10 s and was retried."""
    zero = 1000.0
    freeze = Fault("freeze-node", 5.0, node=1, restart_after=40.0, began=5.0,
                   done=[("froze node-1", 5.0), ("thawed node-1", 45.0)])  # fmt: skip
    subscribers = [_sub(0, [[zero + 35.0, zero + 36.2]]), _sub(1, [])]  # 0 was on node-1; 1 elsewhere
    ledger = _ledger([(4.0, True), (15.0, False), (15.3, True)], [(4.0, 0.01), (15.3, 10.3)])
    result = _result_with(freeze, subscribers, int(zero * 1e9), ledger, [_latency(4, 2), _latency(36, 31_000)])
    validate(result)
    [report] = result["faults"]
    assert [s["what"] for s in report["steps"]] == ["froze node-1", "thawed node-1"]
    assert (report["subscribers_disconnected"], report["subscribers_back_after_s"]) == (1, 31.2)  # before the thaw
    assert (report["publish_errors"], report["publishing_back_after_s"]) == (1, 10.3)
    assert (report["longest_publish_wait_s"], report["worst_delay_ms"]) == (10.3, 31_000)
    assert "worst delivery delay 31.0 s, longest publish wait 10.3 s" in summary_table(result)


def test_an_answer_that_is_no_stream_is_counted_by_cause() -> None:
    json_503 = parse_head(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nX-Node-Id: node-1")
    assert answer_cause(json_503, b'{"detail":"broker unavailable: Connection refused"}') == "503 broker unavailable"
    nginx = parse_head(b"HTTP/1.1 502 Bad Gateway\r\nServer: nginx/1.22.1\r\nContent-Type: text/html")
    assert answer_cause(nginx, b"<html>...</html>") == "502 from the proxy"
    other = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain")
    assert answer_cause(other, b"no") == "404 from the server"
    html = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/html")
    assert not is_event_stream(html)
    assert answer_cause(html, b"") == NOT_EVENT_STREAM
    assert is_event_stream(parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8"))
    assert errno_cause("ECONNREFUSED") == "connection refused"
    assert errno_cause("EPIPE") == "EPIPE"


ANSWERS = {
    b"/retry": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"d\r\nretry: 100\n\n\n\r\n0\r\n\r\n",
    b"/busy": b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nX-Node-Id: n\r\n"
    b'Content-Length: 42\r\n\r\n{"detail":"broker unavailable: try again"}',
    b"/page": b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi",
}
"""What a small server answers per path, on kept-alive connections (the client must end each response)."""


async def _answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    writer.write(ANSWERS[request.split(b" ")[1]])
    await writer.drain()
    with contextlib.suppress(ConnectionError):
        await reader.read()  # keep the connection open until the client closes it


@pytest.mark.parametrize(
    ("path", "errors", "told"),
    [("/retry", set(), True), ("/busy", {"503 broker unavailable"}, False), ("/page", {NOT_EVENT_STREAM}, False)],
)
async def test_a_subscriber_counts_what_kept_it_from_streaming(path: str, errors: set[str], told: bool) -> None:
    server = await asyncio.start_server(_answering, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    recorder = Recorder()
    sub = Subscriber(0, f"127.0.0.1:{port}", path, [0], recorder, retry_s=0.1)
    task = asyncio.create_task(sub.run(lambda: None))
    async with asyncio.timeout(10):
        while recorder.told_to_retry + sum(recorder.connect_errors.values()) < 2:  # two attempts, each refused
            assert not task.done(), task
            await asyncio.sleep(0.02)  # polling the subscriber's own progress on this loop
    sub.stop()
    await asyncio.wait_for(task, 5)
    server.close()
    await server.wait_closed()
    assert set(recorder.connect_errors) == errors
    assert sum(recorder.connect_errors.values()) >= (0 if told else 2)
    assert (recorder.told_to_retry >= 2) is told
    assert not recorder.drops  # a "retry later" is not a dropped stream
    assert sub.gaps == []  # nor was the subscriber back


# -- access tokens --------------------------------------------------------------------------

LOAD_SECRET = "s" * 48


def test_a_token_is_minted_from_the_secret_for_this_runs_topics_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERALD_JWT_SECRET", raising=False)
    assert (from_args([]).token, from_args([]).auth) == (None, "none")
    monkeypatch.setenv("HERALD_JWT_SECRET", LOAD_SECRET)
    config = from_args(["--duration", "100", "--drain", "5"])
    assert config.auth == "minted"
    assert config.token is not None
    claims = jwt.decode(config.token, LOAD_SECRET, algorithms=["HS256"])
    assert claims["herald"] == {"publish": [config.topic_selector], "subscribe": [config.topic_selector]}
    assert claims["exp"] - claims["iat"] >= config.longest_seconds + TOKEN_MARGIN - 1  # never expires mid-run
    rights = TopicMatcher(claims["herald"]["subscribe"])
    assert rights.covers(config.topic_name(0))
    assert rights.covers(config.topic_name(9999))
    assert rights.covers(f"{config.topic_name(0)}-warmup")  # the publishers' warm-up topic
    assert not rights.covers("lt-000000-1")  # no other run's topics
    assert not rights.covers("orders")  # nor anybody else's
    given = from_args(["--token", "abc.def.ghi"])
    assert (given.token, given.auth) == ("abc.def.ghi", "given")  # --token wins over the secret
    assert from_args(["--system", "nchan"]).token is None  # the peers of make bench take none


@pytest.mark.parametrize(
    ("argv", "secret", "message"),
    [
        (["--token", "a.b.c", "--system", "nchan"], None, "nchan takes none"),
        (["--token", "a b"], None, "the token itself"),
        (["--token", ""], None, "the token itself"),
        ([], "too-short", "cannot mint a token from HERALD_JWT_SECRET"),
    ],
)
def test_a_token_the_run_cannot_use_exits_with_status_2(
    argv: list[str],
    secret: str | None,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if secret is None:
        monkeypatch.delenv("HERALD_JWT_SECRET", raising=False)
    else:
        monkeypatch.setenv("HERALD_JWT_SECRET", secret)
    with pytest.raises(SystemExit) as exited:
        from_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_token_is_never_in_the_config_the_result_or_the_summary() -> None:
    config = LoadConfig(subscribers=1, duration=1, rate=1, token="eyJ.secret-part.signature", auth="given")
    assert "secret-part" not in repr(config)
    assert "token" not in config.to_json()
    assert config.to_json()["auth"] == "given"
    result = _result_with(Fault("kill-node", 1.0), [_sub(0, [])], 0)
    result["config"] = config.to_json()
    validate(result)
    assert "secret-part" not in json.dumps(result) + summary_table(result) + render(result)
    assert "a token given with --token" in summary_table(result)
    with pytest.raises(jsonschema.ValidationError):
        validate({**result, "config": {**result["config"], "token": "eyJ..."}})  # the schema refuses one


def test_a_subscriber_sends_its_token_as_a_bearer_header() -> None:
    assert b"\r\nAuthorization: Bearer a.b.c\r\n" in get_request("h:1", "/events?topic=x", None, "a.b.c")
    assert b"Authorization" not in get_request("h:1", "/events?topic=x", "7")
    request = get_request("h:1", "/events?topic=x", "7", "a.b.c")
    assert request.split(b"\r\n")[0] == b"GET /events?topic=x HTTP/1.1"  # the request line stays short
    assert request.endswith(b"Last-Event-ID: 7\r\n\r\n")
