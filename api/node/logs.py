"""A node's log: text (uvicorn's look) or JSON lines, chosen by ``HERALD_LOG_FORMAT``; never a token.

One line for each thing an operator acts on (start, stop, broker down and
back, backfill, slow-client cut-offs, auth failures), logged by Herald's
modules on ``herald.*`` loggers, with the figures as ``extra`` fields::

    logging.getLogger("herald.hub").warning("slow client cut off", extra={"buffered": 1024})

``text`` (the default) prints ``WARNING:  slow client cut off buffered=1024``
as uvicorn prints its own lines; ``json`` prints one object per line, ``{"time",
"level", "logger", "message"}`` plus the extra fields, for a log pipeline.
Uvicorn's lines, Herald's and every other library's warnings share the
format. Uvicorn's access log stays off: no line per request or per event.

Every record passes :class:`RedactSecrets` first, in both formats: whatever
reaches the log, an ``access_token=`` value, a ``Bearer`` credential, anything
shaped like a JWT or a password in a URL is replaced by ``[redacted]``. The
modules never log a token; this is the second line of defence, for the line
that slips.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import re
import time
from collections.abc import Callable
from typing import Any, Final

from uvicorn.logging import DefaultFormatter

FORMATS: Final = ("text", "json")
DEFAULT_FORMAT: Final = "text"
ENV_VAR: Final = "HERALD_LOG_FORMAT"

REDACTED: Final = "[redacted]"

_SECRETS = (
    # ?access_token=... (and the cookie's herald_token=..., a bare token=...) in a URL, a query or a header.
    (re.compile(r"(\b(?:access_token|herald_token|token)=)[^&\s\"'<>;,]+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    # "access_token": "..." in something JSON-like.
    (re.compile(r"(\"(?:access_token|token)\"\s*:\s*\")[^\"]*", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    # Authorization: Bearer ...
    (re.compile(r"(\bBearer\s+)[^\s\"'<>;,]+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    # Anything shaped like a JWT (header.payload.signature; a JSON header always starts "eyJ").
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # A password in a URL (redis://user:password@host).
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@"), rf"\g<1>{REDACTED}@"),
)

STANDARD_ATTRIBUTES: Final = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",  # set by Formatter.format
    "asctime",  # likewise, with a date format
    "taskName",  # Python 3.12's, absent from 3.11's records
    "color_message",  # uvicorn's coloured twin of msg: not a field of its own
    "levelprefix",  # uvicorn's formatters add it to their copy of the record
}
"""Attributes every record has: the rest of a record's ``__dict__`` is what the caller gave in ``extra``."""


class LogFormatError(ValueError):
    """``HERALD_LOG_FORMAT`` names no known format."""


def redact(text: str) -> str:
    """``text`` with every token-like secret in it replaced by ``[redacted]``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def log_format(value: str | None) -> str:
    """The log format ``value`` names, ``text`` when unset (None); LogFormatError when it names none.

    As strict as the node's settings (``api.settings``): exactly ``text`` or ``json``.
    """
    name = DEFAULT_FORMAT if value is None else value
    if name not in FORMATS:
        raise LogFormatError(f"{ENV_VAR}={value!r} is not a log format: use {' or '.join(FORMATS)}")
    return name


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller passed in ``extra=``: the record's attributes beyond the standard ones."""
    return {key: value for key, value in vars(record).items() if key not in STANDARD_ATTRIBUTES}


def _redact_value(value: Any) -> Any:
    """An extra field's value, redacted: strings, and the strings inside lists and dicts; numbers as they are."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(key): _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    return redact(str(value))


class RedactSecrets(logging.Filter):
    """Rewrites a record so that no token survives in it: its message, its extra fields, its traceback.

    On a handler, it sees every record the handler writes, whichever logger
    it came from. The message is rendered here (``msg % args``) so that a
    token passed as an argument is caught too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that don't fit the message: keep both, as logging's own error report would
            message = f"{record.msg} {record.args!r}"
        color = record.__dict__.get("color_message")
        if isinstance(color, str):  # uvicorn prints this one instead of msg when it colours its output
            try:
                record.__dict__["color_message"] = redact(color % record.args if record.args else color)
            except (TypeError, ValueError, KeyError):
                del record.__dict__["color_message"]
        record.msg = redact(message)
        record.args = None
        for key, value in extra_fields(record).items():
            setattr(record, key, _redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _text_value(value: Any) -> str:
    """A field's value in a text line: a plain word as is, other text quoted, anything else as compact JSON."""
    if not isinstance(value, str):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    if value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


class TextFormatter(DefaultFormatter):
    """Uvicorn's ``INFO:     message`` lines, with the record's extra fields after it as ``key=value``."""

    def __init__(self, use_colors: bool | None = None) -> None:
        super().__init__("%(levelprefix)s %(message)s", use_colors=use_colors)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # after the message, before a traceback
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{head} {pairs}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message, extra fields.

    A traceback goes in ``exception`` (one string; its line breaks escaped,
    as JSON escapes every line break), so a record stays one line. An extra
    field named like one of the four keeps its value under ``<name>_``.
    """

    CORE = ("time", "level", "logger", "message")

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry[f"{key}_" if key in self.CORE else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def logging_config(fmt: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` for a node logging in format ``fmt`` (``text`` or ``json``).

    It is also uvicorn's ``log_config``, so that uvicorn, which applies its
    configuration when the server is set up, keeps this one. Everything goes
    to stderr through one handler: uvicorn's and Herald's loggers at INFO,
    any other library's at WARNING (through the root logger).
    """
    formatter: dict[str, Any] = {"()": JsonFormatter} if log_format(fmt) == "json" else {"()": TextFormatter}
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "herald",
        "filters": ["redact"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactSecrets}},
        "formatters": {"herald": formatter},
        "handlers": {"herald": handler},
        "loggers": {
            "uvicorn": {"handlers": ["herald"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            # Off (the server runs with access_log=False): a line per request is not a line to act on.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "herald": {"handlers": ["herald"], "level": "INFO", "propagate": False},
            # api.node.supervisor gives this logger a handler of its own unless it has one: this one.
            "herald.workers": {"handlers": ["herald"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["herald"], "level": "WARNING"},
    }


def configure(value: str | None) -> str:
    """Set up the process's logging for ``HERALD_LOG_FORMAT`` ``value``; the format's name.

    Raises LogFormatError (before changing anything) when ``value`` names no
    format. Python's warnings are logged too, so they come out in the format.
    Give uvicorn a config of its own, ``logging_config(name)``: it applies it
    again when the server is set up (a dictConfig may consume the dict it is given).
    """
    name = log_format(value)
    logging.config.dictConfig(logging_config(name))
    logging.captureWarnings(True)
    return name


class ThrottledLog:
    """One warning at most every ``every`` seconds for an event that can come in floods, with its count.

    A client can make some events as often as it likes (disconnecting in the
    middle of its request, say). Logging each would let it flood the log;
    this logs the first at once, then at most one line per ``every`` seconds
    saying how many came since the previous line.
    """

    def __init__(
        self, logger: logging.Logger, message: str, every: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._message = message
        self._every = every
        self._clock = clock
        self._since = 0
        self._last = -every
        self.total = 0

    def note(self) -> None:
        self.total += 1
        self._since += 1
        now = self._clock()
        if now - self._last >= self._every:
            self._logger.warning(
                "%s (%d since the last such line, %d in all)",
                self._message,
                self._since,
                self.total,
                extra={"count": self._since, "total": self.total},
            )
            self._since = 0
            self._last = now
