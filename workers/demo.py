"""Demo producer: publishes two live streams to a Herald node over ``POST /publish``.

Run it with ``python -m workers.demo`` against a running node, then open
``/?topic=chat&topic=ticker`` on that node to watch both streams:

* a **ticker** on topic ``ticker``: an event of type ``tick`` every
  ``--tick-interval`` seconds, with data ``{"n": n, "time": "<ISO 8601 UTC>"}``;
* a **chat reply streamed token by token** on topic ``chat``, the typing effect
  of a chat assistant: ``reply.start`` with ``{"reply": k, "prompt": "..."}``,
  then one ``reply.token`` per token (a word with its trailing space, or
  punctuation) whose data is the token itself (a JSON string, which Herald sends
  as is), 30-120 ms apart, then ``reply.end`` with ``{"reply": k, "tokens": count}``.
  Replies cycle through :data:`CANNED_REPLIES`, about two seconds apart.

With access control on, every request carries ``Authorization: Bearer``:
the token of ``--token`` (it must allow publishing to both topics), or,
without one, tokens minted from ``HERALD_JWT_SECRET`` for exactly the two
topics, renewed before they expire (:class:`TokenSource`). The token is
never logged.

Both streams run concurrently on one HTTP client. A ``503`` (broker
unavailable) is retried after its ``Retry-After`` delay; network errors and
other 5xx answers are retried with a growing delay. Any other refusal (4xx)
means the demo sent something wrong: it is logged and the demo stops.

Retrying a request whose answer was lost may publish that event twice: the
demo sends no ``Idempotency-Key`` header (Herald takes one on ``POST /publish``,
and a retry with the same key publishes nothing twice; ``workers.produce`` and
the load tool use it). For a demo, a duplicate tick or token does no harm. A
503 is always safe to retry, since nothing was published.

``-v`` logs every tick too; the HTTP client's own lines stay out of it (they
are logged at WARNING and above only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import itertools
import logging
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from api.token import mint_from_environment

log = logging.getLogger("herald.demo")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_CHAT_TOPIC = "chat"
DEFAULT_TICKER_TOPIC = "ticker"
DEFAULT_TICK_INTERVAL = 1.0
TOKEN_DELAY = (0.03, 0.12)
"""Bounds of the random pause between two tokens of a reply, in seconds."""
REPLY_PAUSE = 2.0
"""Pause between two replies, in seconds."""

REQUEST_TIMEOUT = 10.0
RETRY_AFTER_DEFAULT = 1.0
"""Delay before retrying a 503 that carries no usable ``Retry-After``."""
RETRY_AFTER_MAX = 60.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
MINTED_TTL = 3600.0
"""Seconds a token minted from HERALD_JWT_SECRET is valid; a new one is minted halfway."""


@dataclass(frozen=True, slots=True)
class CannedReply:
    """One reply the demo streams, and the prompt it answers."""

    prompt: str
    text: str


CANNED_REPLIES: tuple[CannedReply, ...] = (
    CannedReply(
        "What are Server-Sent Events?",
        "Server-Sent Events (SSE) let a server push updates to the browser over one long-lived HTTP response. "
        "The browser's EventSource opens the stream, parses each event, and reconnects by itself when the "
        "connection drops. It is plain HTTP, so proxies, load balancers and auth work as usual.",
    ),
    CannedReply(
        "How does a chat assistant stream its answer?",
        "The model produces its answer one token at a time, and each token is sent as its own event as soon as "
        "it exists. The page appends every token to the reply, which gives the familiar typing effect. You are "
        "watching exactly that right now: each word here arrived as a separate reply.token event.",
    ),
    CannedReply(
        "What happens if my connection drops mid-reply?",
        "EventSource reconnects and sends the id of the last event it received in the Last-Event-ID header. "
        "Herald keeps a replay buffer per topic, so it sends everything you missed, in order, before going "
        "live again. If that history is gone, you get a reset event instead of a silent gap.",
    ),
    CannedReply(
        "Why not WebSockets?",
        "WebSockets are great when both sides talk all the time. For server-to-client updates, SSE is simpler: "
        "it needs no protocol upgrade, it resumes with ids built into the format, and publishing is just an HTTP "
        "POST to /publish. Herald fans each event out to every subscriber of its topic.",
    ),
    CannedReply(
        "How do I publish my own events?",
        'POST a JSON body like {"topic": "news", "data": {"n": 1}, "event": "update"} to /publish, or an '
        "array of them to publish a batch atomically. Herald answers 201 with the ids it gave them. If the "
        "broker is down it answers 503 with Retry-After; wait that long and try again!",
    ),
)

_TOKEN = re.compile(r"\w+(?:['\u2019]\w+)*\s*|[^\w\s]+\s*|\s+")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into reply tokens: words and punctuation runs, each with its trailing whitespace.

    Joining the tokens gives back ``text`` exactly.
    """
    return _TOKEN.findall(text)


def utc_now_iso() -> str:
    """The current time in ISO 8601, UTC, with millisecond precision (e.g. ``2025-01-31T12:00:00.123+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PublishRejected(Exception):
    """Herald refused a request with a 4xx (or another unexpected answer): the demo has a bug."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"publish refused with {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


@dataclass(slots=True)
class DemoStats:
    """What a run published so far (counted once Herald answered 201)."""

    ticks: int = 0
    replies: int = 0
    tokens: int = 0
    events: int = 0


def retry_after_seconds(value: str | None, default: float = RETRY_AFTER_DEFAULT) -> float:
    """The delay a ``Retry-After`` header asks for: delta-seconds or an HTTP date, capped at a minute."""
    if value is None:
        return default
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - datetime.now(UTC)).total_seconds(), 0.0), RETRY_AFTER_MAX)


class TokenSource:
    """The access token the demo publishes with: a fixed one, minted ones renewed halfway through, or none."""

    def __init__(
        self,
        token: str | None = None,
        minter: Callable[[], str | None] | None = None,
        ttl: float = MINTED_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token = token
        self._minter = minter
        self._ttl = ttl
        self._clock = clock
        self._renew_at = float("-inf")

    @classmethod
    def from_environment(cls, topics: Sequence[str], ttl: float = MINTED_TTL) -> TokenSource:
        """Tokens minted from ``HERALD_JWT_SECRET`` that may publish to ``topics``; none when it is unset.

        Raises ValueError for a secret that cannot sign (too short, or HERALD_JWT_ALGORITHMS not HMAC).
        """

        def minter() -> str | None:
            return mint_from_environment(publish=list(topics), sub="demo", ttl=ttl)

        source = cls(minter=minter, ttl=ttl)
        source.current()  # a secret that cannot sign fails now, not at the first publish
        return source

    @property
    def minted(self) -> bool:
        return self._minter is not None and self._token is not None

    def current(self) -> str | None:
        """The token to send now (minting a fresh one when the last is half expired)."""
        if self._minter is not None and self._clock() >= self._renew_at:
            self._token = self._minter()
            self._renew_at = self._clock() + self._ttl / 2
        return self._token


class Publisher:
    """Publishes events to one Herald node, retrying while the node or its broker is unavailable."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        stats: DemoStats | None = None,
        token: str | TokenSource | None = None,
    ) -> None:
        self._client = client
        self._endpoint = f"{url.rstrip('/')}/publish"
        self.stats = stats if stats is not None else DemoStats()
        self._token = token if isinstance(token, TokenSource) else TokenSource(token)

    def _headers(self) -> dict[str, str] | None:
        token = self._token.current()
        return {"authorization": f"Bearer {token}"} if token else None

    async def publish(self, topic: str, event: str, data: object) -> str:
        """Publish one event and return its id once Herald accepted it.

        Retries 503 after ``Retry-After``, and network errors and other 5xx
        with exponential backoff, for as long as it takes (cancel to stop).
        Raises :class:`PublishRejected` on any other answer.
        """
        body = {"topic": topic, "data": data, "event": event}
        backoff = BACKOFF_FIRST
        while True:
            try:
                response = await self._client.post(self._endpoint, json=body, headers=self._headers())
            except httpx.TransportError as exc:
                log.warning("publish to %s failed (%s); retrying in %.1fs", self._endpoint, exc or type(exc), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if response.is_success:
                self.stats.events += 1
                published = response.json()
                return str(published["id"]) if isinstance(published, dict) else ""
            if response.status_code == 503:
                delay = retry_after_seconds(response.headers.get("retry-after"))
                log.warning("broker unavailable (503: %s); retrying in %.1fs", _detail(response), delay)
                await asyncio.sleep(delay)
                continue
            if response.status_code >= 500:
                log.warning("node error %d (%s); retrying in %.1fs", response.status_code, _detail(response), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            raise PublishRejected(response.status_code, _detail(response))


def _detail(response: httpx.Response) -> str:
    """The ``detail`` of a Herald error body, or the start of whatever the body is."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:200]


async def stream_ticker(publisher: Publisher, topic: str, interval: float) -> None:
    """Publish ``tick`` events forever: one at once, then one every ``interval`` seconds.

    The schedule is kept against the loop's clock, so a slow publish delays
    one tick, not all that follow.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in itertools.count(1):
        await publisher.publish(topic, "tick", {"n": n, "time": utc_now_iso()})
        publisher.stats.ticks += 1
        log.debug("tick %d", n)
        # The next slot after now: a publish slower than the interval skips ticks instead of bursting.
        elapsed = loop.time() - start
        await asyncio.sleep(max(0.0, (int(elapsed // interval) + 1) * interval - elapsed))


async def stream_reply(publisher: Publisher, topic: str, number: int, reply: CannedReply, rng: random.Random) -> int:
    """Stream one reply token by token: ``reply.start``, each ``reply.token``, ``reply.end``.

    Returns how many tokens were sent.
    """
    tokens = tokenize(reply.text)
    log.info("reply %d: %s", number, reply.prompt)
    await publisher.publish(topic, "reply.start", {"reply": number, "prompt": reply.prompt})
    for token in tokens:
        await asyncio.sleep(rng.uniform(*TOKEN_DELAY))
        await publisher.publish(topic, "reply.token", token)
        publisher.stats.tokens += 1
    await publisher.publish(topic, "reply.end", {"reply": number, "tokens": len(tokens)})
    publisher.stats.replies += 1
    return len(tokens)


async def stream_chat(
    publisher: Publisher,
    topic: str,
    replies: int | None,
    rng: random.Random,
    canned: Sequence[CannedReply] = CANNED_REPLIES,
) -> None:
    """Stream replies one after another, cycling through ``canned``; stop after ``replies`` if given."""
    numbers: Iterator[int] = itertools.count(1) if replies is None else iter(range(1, replies + 1))
    for number, reply in zip(numbers, itertools.cycle(canned), strict=False):
        if number > 1:
            await asyncio.sleep(REPLY_PAUSE)
        await stream_reply(publisher, topic, number, reply, rng)


async def run(
    url: str = DEFAULT_URL,
    *,
    chat_topic: str = DEFAULT_CHAT_TOPIC,
    ticker_topic: str = DEFAULT_TICKER_TOPIC,
    tick_interval: float = DEFAULT_TICK_INTERVAL,
    replies: int | None = None,
    duration: float | None = None,
    seed: int | None = None,
    client: httpx.AsyncClient | None = None,
    token: str | TokenSource | None = None,
) -> DemoStats:
    """Publish the ticker and the streamed chat replies to the node at ``url``, concurrently.

    Runs until ``replies`` replies have been streamed (the ticker stops with
    them), until ``duration`` seconds have passed, whichever comes first; with
    neither, until cancelled. ``seed`` makes the pauses between tokens
    reproducible. ``client`` replaces the HTTP client the run would open
    (the caller then closes it). ``token``: what to publish with when access
    control is on (a token, or a :class:`TokenSource`); none by default.

    Returns what was published. Raises :class:`PublishRejected` when Herald
    refuses a request for a reason other than its broker being unavailable.
    """
    if tick_interval <= 0:
        raise ValueError("tick_interval must be positive")
    if replies is not None and replies < 0:
        raise ValueError("replies must not be negative")
    if duration is not None and duration < 0:
        raise ValueError("duration must not be negative")
    stats = DemoStats()
    rng = random.Random(seed)
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=REQUEST_TIMEOUT))
        publisher = Publisher(client, url, stats, token)
        tasks = [
            asyncio.create_task(stream_chat(publisher, chat_topic, replies, rng), name="demo-chat"),
            asyncio.create_task(stream_ticker(publisher, ticker_topic, tick_interval), name="demo-ticker"),
        ]
        try:
            # The chat ends by itself when replies are bounded; the ticker only ever ends by failing.
            async with asyncio.timeout(duration):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            log.info("duration of %ss reached", duration)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result
    return stats


def positive_float(text: str) -> float:
    """argparse type: a number above zero."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number of at least zero."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least zero."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m workers.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.demo",
        description=(
            "Publish a ticker and a chat reply streamed token by token to a Herald node. "
            "Watch them at <url>/?topic=chat&topic=ticker. Ctrl-C stops."
        ),
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("HERALD_URL") or DEFAULT_URL,
        help="base URL of the node (default: $HERALD_URL, else %(default)s)",
    )
    parser.add_argument("--chat-topic", default=DEFAULT_CHAT_TOPIC, help="topic of the replies (default: %(default)s)")
    parser.add_argument(
        "--ticker-topic", default=DEFAULT_TICKER_TOPIC, help="topic of the ticks (default: %(default)s)"
    )
    parser.add_argument(
        "--tick-interval",
        type=positive_float,
        default=DEFAULT_TICK_INTERVAL,
        metavar="SECONDS",
        help="seconds between ticks (default: %(default)s)",
    )
    parser.add_argument(
        "--replies", type=non_negative_int, metavar="N", help="stop after N replies (default: run forever)"
    )
    parser.add_argument(
        "--duration", type=non_negative_float, metavar="SECONDS", help="stop after this long (default: run forever)"
    )
    parser.add_argument("--seed", type=int, help="seed for the pauses between tokens (default: random)")
    parser.add_argument(
        "--token",
        help="access token for a node with access control on, allowed to publish to both topics "
        "(default: minted from $HERALD_JWT_SECRET when set, else none)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log every tick")
    return parser


async def _run_until_signalled(args: argparse.Namespace, token: TokenSource) -> DemoStats:
    """:func:`run` with the command line's arguments; SIGTERM cancels it like Ctrl-C."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    installed = False
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform or thread
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            installed = True
    try:
        return await run(
            args.url,
            chat_topic=args.chat_topic,
            ticker_topic=args.ticker_topic,
            tick_interval=args.tick_interval,
            replies=args.replies,
            duration=args.duration,
            seed=args.seed,
            token=token,
        )
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point. Returns the exit status: 0 when stopped normally (or by Ctrl-C), 1 on a refusal,
    2 when no token can be minted from HERALD_JWT_SECRET."""
    args = build_parser().parse_args(argv)
    # -v is about the demo's own lines: other libraries (httpx logs every request at INFO, httpcore every step
    # of it at DEBUG) log their warnings only, however verbose the demo is.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("herald").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.token is not None:
        token, how = TokenSource(args.token), "with the token given"
    else:
        try:
            token = TokenSource.from_environment([args.chat_topic, args.ticker_topic])
        except ValueError as exc:
            log.error("cannot mint a token from HERALD_JWT_SECRET: %s", exc)
            return 2
        how = "with tokens minted from HERALD_JWT_SECRET" if token.minted else "without a token"
    log.info("publishing to %s: topics %r and %r, %s", args.url, args.chat_topic, args.ticker_topic, how)
    try:
        stats = asyncio.run(_run_until_signalled(args, token))
    except PublishRejected as exc:
        log.error("stopping: %s", exc)
        if exc.status_code in (401, 403):
            log.error(
                "the node has access control on: pass --token (allowed to publish to %r and %r), "
                "or set HERALD_JWT_SECRET to the node's secret",
                args.chat_topic,
                args.ticker_topic,
            )
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("stopped")
        return 0
    log.info("done: %d replies (%d tokens), %d ticks", stats.replies, stats.tokens, stats.ticks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
