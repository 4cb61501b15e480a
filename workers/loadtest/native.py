"""The compiled parts of the load tool (``csrc/``): where they are built, and building them.

* ``sse_worker.c``: ``--client native`` runs it in place of
  ``python -m workers.loadtest.worker``: the same protocol and accounting, at
  a fraction of the CPU per read, so the tool can out-run a server that
  writes once per event per socket.
* ``sse_publisher.c``: ``--publisher native`` runs it in place of the
  Python pacers (:mod:`workers.loadtest.publisher`): one event per request,
  closed loop or pipelined (``--pipeline``), at a few microseconds of CPU
  per request, so the publisher is never what limits a fast server.

Both need a C compiler and Debian's ``libcjson-dev``
(``ops/install-system-deps.sh`` installs both); each is built on first use
into ``.run/native`` and rebuilt whenever its source is newer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from workers.loadtest.config import ROOT

SOURCE = Path(__file__).with_name("csrc") / "sse_worker.c"
BINARY = ROOT / ".run" / "native" / "sse-worker"
PUBLISHER_SOURCE = Path(__file__).with_name("csrc") / "sse_publisher.c"
COMMON_HEADER = Path(__file__).with_name("csrc") / "common.h"
"""What both programs include: a change to it rebuilds both."""
PUBLISHER_BINARY = ROOT / ".run" / "native" / "sse-publisher"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]
LIBS = ["-lcjson", "-lm"]


class NativeUnavailable(RuntimeError):
    """A native part cannot be built here (no compiler, or no cJSON headers)."""


def build_publisher(binary: Path = PUBLISHER_BINARY) -> Path:
    """The compiled publisher's path, compiled first if missing or older than its source."""
    return build(binary, PUBLISHER_SOURCE)


def build(binary: Path = BINARY, source: Path = SOURCE) -> Path:
    """The subscriber worker's path (or ``source``'s, built as ``binary``), compiled first if missing or older.

    Older means older than its source or than ``csrc/common.h``, which both programs include.
    """
    newest = max(source.stat().st_mtime, COMMON_HEADER.stat().st_mtime)
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeUnavailable("no C compiler: install gcc (ops/install-system-deps.sh does)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(binary.name + ".partial")
    done = subprocess.run(
        [compiler, *CFLAGS, "-o", str(partial), str(source), *LIBS], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        hint = " (install libcjson-dev: ops/install-system-deps.sh does)" if "cJSON" in done.stderr else ""
        raise NativeUnavailable(f"building {source.name} failed{hint}:\n{done.stderr.strip()}")
    os.replace(partial, binary)  # atomic: a concurrent run never sees a half-written binary
    return binary
