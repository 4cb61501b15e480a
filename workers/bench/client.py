"""The compiled load client driven directly, for the scenarios the load tool's runner has no shape for.

The idle-memory and reconnect-storm scenarios need a client that connects
everyone and then does as told ("disconnect", "reconnect"), not a timed
publishing run; this drives ``workers/loadtest/csrc/sse_worker.c`` over its
stdin/stdout protocol (see :mod:`workers.loadtest.worker`), pinned to the
client's core like the load tool.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import time
from types import TracebackType
from typing import Any, Self

from workers.bench.systems import CLIENT_CORE, pinned
from workers.loadtest import native


class LineProcess:
    """A compiled load program spoken to in JSON lines over its stdin and stdout (``argv``, already pinned)."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next message of type ``kind`` (others are skipped); TimeoutError after ``timeout`` seconds."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    message: dict[str, Any] = json.loads(line)
                    if message["type"] == kind:
                        return message
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(f"no {kind!r} from the load client within {timeout}s")
                chunk = self.process.stdout.read1(1 << 20)  # type: ignore[attr-defined]
                if not chunk:
                    raise RuntimeError(f"the load client exited (status {self.process.wait()}) before {kind!r}")
                self._buffer += chunk

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class NativeClient(LineProcess):
    """One ``sse-worker`` process with ``subscribers`` connections (``(index, "host:port", path, topics)``)."""

    def __init__(
        self, subscribers: list[tuple[int, str, str, list[int]]], ramp: float = 0.0, token: str | None = None
    ) -> None:
        super().__init__(pinned(CLIENT_CORE, [str(native.build())]))
        setup: dict[str, Any] = {"worker": 0, "subscribers": subscribers, "ramp": ramp, "connect_timeout": 60.0}
        if token:
            setup["token"] = token  # every subscriber's Authorization: Bearer (access control on)
        self.send({"setup": setup})

    def ready(self, timeout: float = 90) -> dict[str, Any]:
        """Wait until every subscriber has had its 200; from now on, every subscriber counts (go)."""
        message = self.wait_for("ready", timeout)
        self.send({"cmd": "go", "t0_ns": time.time_ns()})
        return message

    def finish(self, last: dict[int, int]) -> dict[str, Any]:
        """Stop, and the per-subscriber accounting against ``last`` (every event accepted)."""
        self.send({"cmd": "finish", "last": {str(t): n for t, n in last.items()}, "unaccepted": {}})
        return self.wait_for("result", 60)
