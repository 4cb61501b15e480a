"""One load run, start to end: workers up, subscribers in, publish, faults, drain, add up.

Every phase has a bound, so a run always ends by itself: connecting within
``ramp + connect_timeout``, publishing for ``duration`` (plus ``retry_for``
for a request still being retried), draining for at most ``drain``, and
the workers' final reports within :data:`FINISH_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from workers.loadtest import native
from workers.loadtest.config import LoadConfig, raise_open_files
from workers.loadtest.faults import Fault, inject, load_cluster
from workers.loadtest.native_publisher import NativePublisher, fill_ledger
from workers.loadtest.publisher import HttpSender, Ledger, Pacer, RedisSender, Sender, pacers_for
from workers.loadtest.results import Aggregate, build, progress_line
from workers.loadtest.server_counts import plan
from workers.loadtest.worker import CpuMeter, MachineCpu

FINISH_TIMEOUT = 30.0
FILES_PER_SUBSCRIBER = 1
SPARE_FILES = 256


class WorkerProcess:
    """A ``workers.loadtest.worker`` child: its subscribers, its pipe, its messages."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, aggregate: Aggregate) -> None:
        self.index = index
        self.process = process
        self.aggregate = aggregate
        self.ready = asyncio.Event()
        self.caught_up = asyncio.Event()
        self.finished = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self.process.stdin.drain()

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                message = json.loads(line)
                self.aggregate.on_message(self.index, message)
                kind = message["type"]
                if kind == "ready":
                    self.ready.set()
                elif kind == "caught_up":
                    self.caught_up.set()
                elif kind == "result":
                    self.finished.set()
        finally:
            # A worker that dies sets everything, so the run does not wait for it.
            self.ready.set()
            self.caught_up.set()
            self.finished.set()

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


def worker_command(client: str) -> list[str]:
    """How to start one subscriber worker: the Python module, or the compiled one (built if needed)."""
    if client == "native":
        return [str(native.build())]
    return [sys.executable, "-m", "workers.loadtest.worker"]


async def _spawn(config: LoadConfig, aggregate: Aggregate) -> list[WorkerProcess]:
    workers = []
    command = worker_command(config.client)
    for index in range(config.procs):
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,
        )
        worker = WorkerProcess(index, process, aggregate)
        subscribers = []
        for i in range(index, config.subscribers, config.procs):
            target = config.targets[i % len(config.targets)].removeprefix("http://")
            topics = config.topics_of(i)
            path = config.subscribe_path(topics)
            subscribers.append([i, target, path, topics])
        setup = {
            "worker": index,
            "subscribers": subscribers,
            "ramp": config.ramp,
            "connect_timeout": config.connect_timeout,
            "read_pause": config.read_pause_ms / 1000,
            "silence": config.silence_seconds,
        }
        if config.token:
            setup["token"] = config.token  # over the worker's own pipe: never on a command line
        await worker.send({"setup": setup})
        workers.append(worker)
    return workers


def faults_of(config: LoadConfig) -> list[Fault]:
    """The faults ``config`` asks for, in the order of their times."""
    faults = []
    if config.kill_node_at is not None:
        faults.append(Fault("kill-node", config.kill_node_at, config.kill_node, config.restart_node_after))
    if config.restart_nodes_at is not None:
        faults.append(Fault("restart-nodes", config.restart_nodes_at))
    if config.stop_all_nodes_at is not None:
        faults.append(Fault("stop-all-nodes", config.stop_all_nodes_at, restart_after=config.stop_all_for))
    if config.restart_redis_at is not None:
        faults.append(Fault("restart-redis", config.restart_redis_at))
    if config.failover_redis_at is not None:
        faults.append(Fault("failover-redis", config.failover_redis_at))
    if config.freeze_node_at is not None:
        faults.append(Fault("freeze-node", config.freeze_node_at, config.freeze_node, config.freeze_for))
    if config.freeze_redis_at is not None:
        faults.append(Fault("freeze-redis", config.freeze_redis_at, restart_after=config.freeze_for))
    return sorted(faults, key=lambda f: f.at)


def _sender(config: LoadConfig, pacer: int) -> Sender:
    names = [config.topic_name(t) for t in range(config.topics)]
    if config.publish == "redis":
        assert config.redis_url is not None
        from workers.produce import nodes_retention  # with Redis (redis-py): only for --publish redis

        return RedisSender(config.redis_url, names, config.payload, nodes_retention())
    return HttpSender(config.targets, names, config.payload, pacer, config.system, config.token, config.protocol)


async def run(config: LoadConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``config`` and return the result (see :func:`workers.loadtest.results.build`)."""
    open_files = raise_open_files(config.subscribers * FILES_PER_SUBSCRIBER + SPARE_FILES)
    per_proc = -(-config.subscribers // config.procs)
    if per_proc + SPARE_FILES > open_files[0]:
        raise SystemExit(
            f"cannot open {per_proc:,} connections in one process: the open-files limit is {open_files[0]:,} "
            f"(hard limit {open_files[1]:,}); raise it (ulimit -n) or use more --procs"
        )
    faults = faults_of(config)
    # One Cluster per fault: each tracks the processes it starts, and two faults may run at once.
    clusters = [load_cluster(config.cluster_dir) for _ in faults]
    if config.failover_redis_at is not None and not clusters[0].sentinel:
        raise SystemExit(
            f"--failover-redis-at needs a cluster with Redis Sentinel (make cluster SENTINEL=1); "
            f"the one in {config.cluster_dir} has none"
        )
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    aggregate = Aggregate(config.procs)
    ledger = Ledger(config.topics)
    # The nodes' own counts, before any subscriber connects (never fails the run: a reason instead).
    scrapes = plan(config)
    await scrapes.read_before()
    workers = await _spawn(config, aggregate)
    senders: list[Sender] = []
    fast: NativePublisher | None = None
    fault_tasks: list[asyncio.Task[None]] = []
    try:
        say(f"connecting {config.subscribers:,} subscribers to {', '.join(config.targets)} ...")
        wait = config.ramp + config.connect_timeout + 10
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), wait)
        ready = aggregate.total("ready")
        if ready < config.subscribers:
            say(f"only {ready:,} of {config.subscribers:,} subscribers connected; publishing anyway")

        topic_pacers = pacers_for(config.topics, config.publishers)
        if config.publisher == "native":
            # Its connections are open before time zero: no warm-up publish needed.
            fast = await NativePublisher.start(config, config.connect_timeout)
        else:
            senders.extend(_sender(config, index) for index in range(len(topic_pacers)))
            await asyncio.gather(*(send.warmup() for send in senders))

        # Publishing starts: the timeline's zero, for the workers and the faults alike.
        t0_ns = time.time_ns()
        ledger.t0 = time.monotonic()
        for worker in workers:
            await worker.send({"cmd": "go", "t0_ns": t0_ns})
        pacers = []
        # The Python pacers, one per sender (none with the native publisher, which paces its own).
        for index, (topics, send) in enumerate(zip(topic_pacers if fast is None else [], senders, strict=True)):
            rate = config.rate * len(topics) / config.topics
            pacers.append(
                Pacer(
                    index=index,
                    topics=topics,
                    rate=rate,
                    duration=config.duration,
                    batch=config.events_per_request,
                    retry_for=config.retry_for,
                    run_id=config.run_id,
                    seed=config.seed,
                    ledger=ledger,
                    send=send,
                )
            )
        cpu = CpuMeter()
        machine = MachineCpu()
        publisher_cpu: list[float] = []
        machine_cpu: list[float] = []
        fault_tasks += [asyncio.create_task(inject(c, f, ledger.t0)) for c, f in zip(clusters, faults, strict=True)]
        if fast is not None:
            await fast.go()
            publishing: asyncio.Future[Any] = asyncio.ensure_future(fast.wait())
        else:
            publishing = asyncio.gather(*(pacer.run() for pacer in pacers))
        shown: dict[str, float] = {}

        def show(note: str = "") -> None:
            elapsed = time.monotonic() - ledger.t0
            if config.progress and elapsed - shown.get("t", 0.0) >= 0.9:
                say(progress_line(elapsed, ledger, aggregate, shown) + note)

        while True:
            done, _ = await asyncio.wait([publishing], timeout=1.0)
            publisher_cpu.append(cpu.take())  # with the native publisher, replaced by its own below
            busy = machine.take()
            if busy is not None:
                machine_cpu.append(busy)
            show()
            if done:
                break
        publishing.result()
        publish_seconds = time.monotonic() - ledger.t0
        if fast is not None:
            assert fast.result is not None
            fill_ledger(ledger, fast.result)
            publish_seconds = float(fast.result["seconds"])  # its own clock: go to the last answer
            publisher_cpu = fast.cpu or [float(fast.result["cpu"])]
        for task in fault_tasks:
            await task  # a fault set after the end of publishing still happens, and is waited for

        # Drain: every subscriber should get the last accepted event of each of its topics.
        last = ledger.last()
        for worker in workers:
            await worker.send({"cmd": "expect", "last": ledger.last_accepted()})
        drain_until = time.monotonic() + config.drain
        draining = asyncio.gather(*(w.caught_up.wait() for w in workers))
        while True:
            drained, _ = await asyncio.wait([draining], timeout=min(1.0, max(0.0, drain_until - time.monotonic())))
            show("  (draining)")
            if drained or time.monotonic() >= drain_until:
                break
        draining.cancel()

        unaccepted = {t: sorted(s) for t, s in ledger.unaccepted.items()}
        for worker in workers:
            await worker.send({"cmd": "finish", "last": last, "unaccepted": unaccepted})
        await asyncio.wait_for(asyncio.gather(*(w.finished.wait() for w in workers)), FINISH_TIMEOUT)
        if len(aggregate.results) < len(workers):
            raise RuntimeError("a subscriber worker died before reporting; see its error above")
        # Every subscriber has let go: read the nodes again, once they have let go of the streams too.
        await scrapes.read_after()
        return build(
            config,
            ledger,
            aggregate,
            faults,
            started_at=started_at,
            t0_ns=t0_ns,
            publish_seconds=publish_seconds,
            publisher_cpu=publisher_cpu,
            machine_cpu=machine_cpu,
            open_files=open_files,
            scrapes=scrapes,
            warmed=sum(send.warmed for send in senders) if config.publish == "http" else 0,
        )
    finally:
        for task in fault_tasks:
            task.cancel()  # a run that failed part-way: no fault goes on after it
        # ... and a frozen process is thawed before the run ends (faults._freeze thaws on cancel).
        await asyncio.gather(*fault_tasks, return_exceptions=True)
        for send in senders:
            with contextlib.suppress(Exception):
                await send.close()
        if fast is not None:
            await fast.close()
        for worker in workers:
            await worker.stop()
