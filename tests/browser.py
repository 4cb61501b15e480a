"""A small headless-Chromium driver over the Chrome DevTools Protocol, for tests where the browser is the judge.

No new dependency: Debian's ``chromium`` runs headless with a remote-debugging
port on loopback, its page target is found through ``/json`` (httpx), and the
DevTools WebSocket is spoken with ``websockets`` (installed with
``uvicorn[standard]``). Nothing is downloaded: the browser is the system's.

    async with chromium() as browser:
        await browser.navigate("http://127.0.0.1:8080/healthz")
        assert await browser.evaluate("1 + 1") == 2

Each browser gets a new profile in a temporary directory and its own process
group; leaving the context kills that group by pid and removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from ops.probe import free_port

CHROMIUM = shutil.which("chromium")

# Headless, and quiet: this machine's network is closed, so everything Chromium
# would fetch by itself in the background (updates, sync, safe browsing) is off.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools command failed, or a page could not be loaded."""


class JavaScriptError(BrowserError):
    """An evaluated expression threw (or its promise rejected); the message is the page's description."""


class Browser:
    """One headless Chromium process and a DevTools session on its first page.

    Commands may be issued concurrently from one event loop; each waits for
    its own answer. After :meth:`close` (or when Chromium dies) every command
    raises :class:`BrowserError`.
    """

    def __init__(self, process: asyncio.subprocess.Process, profile: Path, port: int) -> None:
        self.process = process
        self.profile = profile
        self.port = port
        self._socket: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._handlers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def launch(cls, executable: str | None = None, timeout: float = 60) -> Browser:
        """Start Chromium on a free loopback port with a new profile and attach to its page.

        Raises :class:`BrowserError` when no page target is offered within
        ``timeout`` seconds (Chromium's own output is then in the message).
        Nothing is left running or on disk when this raises.
        """
        executable = executable or CHROMIUM
        if executable is None:
            raise BrowserError("chromium is not installed")
        profile = Path(tempfile.mkdtemp(prefix="herald-chromium-"))
        port = free_port()
        args = [executable, *FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"]
        with (profile / "chromium.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        browser = cls(process, profile, port)
        try:
            await asyncio.wait_for(browser._attach(), timeout)
        except BaseException as error:
            output = browser.log()[-2000:]
            await browser.close()
            if isinstance(error, TimeoutError):
                raise BrowserError(f"chromium offered no page within {timeout}s:\n{output}") from error
            raise
        return browser

    async def _attach(self) -> None:
        """Find the page target (polling /json while Chromium starts) and open its DevTools socket."""
        url: str | None = None
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            while url is None:
                if self.process.returncode is not None:
                    raise BrowserError(f"chromium exited with {self.process.returncode}:\n{self.log()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    targets = (await client.get(f"http://127.0.0.1:{self.port}/json")).json()
                    url = next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
                if url is None:
                    await asyncio.sleep(0.05)  # polling a starting process: nothing to await
        self._socket = await connect(url, max_size=None, proxy=None, ping_interval=None, compression=None)
        self._reader = asyncio.create_task(self._read(self._socket))
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _read(self, socket: ClientConnection) -> None:
        """Route each message: a command's answer to its caller, an event to whoever waits for it."""
        try:
            async for raw in socket:
                message: dict[str, Any] = json.loads(raw)
                if "id" in message:
                    answer = self._answers.pop(message["id"], None)
                    if answer is not None and not answer.done():
                        answer.set_result(message)
                elif "method" in message:
                    params = message.get("params", {})
                    for handler in self._handlers.get(message["method"], []):
                        handler(params)
                    for waiter in self._listeners.pop(message["method"], []):
                        if not waiter.done():
                            waiter.set_result(params)
        except Exception:  # the socket broke: Chromium died or was killed
            pass
        finally:
            gone = BrowserError("the DevTools connection is closed")
            for future in [*self._answers.values(), *itertools.chain(*self._listeners.values())]:
                if not future.done():
                    future.set_exception(gone)
            self._answers.clear()
            self._listeners.clear()

    def on(self, method: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Call ``handler`` with the params of every later ``method`` event (e.g. ``Network.responseReceived``).

        The handler runs on the reader task: it must not block or raise. Enable
        the event's domain first (``await browser.send("Network.enable")``).
        """
        self._handlers.setdefault(method, []).append(handler)

    def _next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the params of the next ``method`` event (register it before causing the event)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._listeners.setdefault(method, []).append(future)
        return future

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10) -> dict[str, Any]:
        """Run one DevTools command and return its ``result``.

        Raises :class:`BrowserError` when the command fails or the browser is
        gone, TimeoutError when no answer comes within ``timeout`` seconds.
        """
        if self._socket is None or self._closed or (self._reader is not None and self._reader.done()):
            raise BrowserError("the browser is closed")
        ident = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[ident] = answer
        try:
            await self._socket.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
            message = await asyncio.wait_for(answer, timeout)
        finally:
            self._answers.pop(ident, None)
        if "error" in message:
            raise BrowserError(f"{method}: {message['error'].get('message', message['error'])}")
        result: dict[str, Any] = message.get("result", {})
        return result

    async def navigate(self, url: str, timeout: float = 15) -> None:
        """Load ``url`` in the page and return once its ``load`` event fired.

        Raises :class:`BrowserError` when the navigation fails (e.g. the
        connection is refused), TimeoutError when it does not load in time.
        """
        loaded = self._next_event("Page.loadEventFired")
        try:
            result = await self.send("Page.navigate", {"url": url}, timeout)
            if result.get("errorText"):
                raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
            await asyncio.wait_for(loaded, timeout)
        finally:
            loaded.cancel()

    async def evaluate(self, expression: str, timeout: float = 10) -> Any:
        """The value of a JavaScript ``expression`` in the page, as JSON (a promise is awaited first).

        ``undefined`` comes back as None; values JSON can't carry (functions,
        DOM objects) come back as whatever DevTools makes of them (often an
        empty dict). Raises :class:`JavaScriptError` when the expression throws.
        """
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = await self.send("Runtime.evaluate", params, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(str(description))
        return result["result"].get("value")

    async def until(self, expression: str, done: Callable[[Any], bool] = bool, timeout: float = 10) -> Any:
        """Evaluate ``expression`` until ``done(value)`` holds or ``timeout`` seconds passed; the last value.

        For a page's own progress (an EventSource's events, its readyState),
        which DevTools has no event for: the value is polled every 50 ms and
        returned either way, so the caller's assertion can show it.
        """
        deadline = time.monotonic() + timeout
        value = await self.evaluate(expression)
        while not done(value) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the page's own state: DevTools has nothing to await
            value = await self.evaluate(expression)
        return value

    def log(self) -> str:
        """What Chromium printed so far (its stdout and stderr)."""
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")
        except OSError:
            return ""

    async def close(self) -> None:
        """Stop Chromium and everything it started, remove the profile. Idempotent.

        Chromium is asked to close (so it reaps its own children), then its
        whole process group is killed by pid (start_new_session made
        Chromium's pid the group id) whatever it did. On return no process
        of the group runs any more and the profile directory is gone.
        """
        if self._closed:
            return
        if self.process.returncode is None and self._socket is not None:
            with contextlib.suppress(Exception):
                await self.send("Browser.close", timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._socket.close(), 2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)
        deadline = time.monotonic() + 5
        while live_processes(self.process.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # SIGKILL is delivered, not awaited: poll /proc until the group is gone
        # A child may have been writing into the profile up to the kill.
        while self.profile.exists():
            shutil.rmtree(self.profile, ignore_errors=True)
            if self.profile.exists():
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)


def live_processes(group: int) -> list[int]:
    """The pids of process group ``group`` that still run (zombies are dead: they only wait to be reaped)."""
    pids: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process ended while we looked
        # After the command: state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


BLANK_PAGE = b"<!doctype html><meta charset=utf-8><title>herald test origin</title>"


@contextlib.contextmanager
def static_origin(page: bytes = BLANK_PAGE) -> Iterator[str]:
    """An HTTP server on a free loopback port answering ``GET /`` with ``page``; yields its origin.

    A page loaded from it is on an origin of its own (``http://127.0.0.1:PORT``),
    so what it asks of a node on another port is cross-origin (CORS), though
    same-site: cookies for ``127.0.0.1`` go with it. Other paths answer 404.
    The server runs in a thread of this process; leaving the block shuts it
    down and closes its socket.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.partition("?")[0] != "/":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: a test's output is its own

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="static-origin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.asynccontextmanager
async def chromium(executable: str | None = None) -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile, attached to its page; killed and cleaned up on exit."""
    browser = await Browser.launch(executable)
    try:
        yield browser
    finally:
        await browser.close()
