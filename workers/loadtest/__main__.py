"""``python -m workers.loadtest``: run, print the summary, write ``--json`` and ``--report``.

Exit status: 0 when every accepted event reached every subscriber exactly
once and in order, 1 when not (the summary says why), 2 for bad options.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from workers.loadtest import native
from workers.loadtest.config import from_args
from workers.loadtest.results import summary_table, write_json
from workers.loadtest.runner import run


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    config = from_args(argv)
    try:
        import uvloop

        run_loop: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        run_loop = asyncio.run
    try:
        result = run_loop(run(config, _say))
    except native.NativeUnavailable as exc:  # --client native, where it cannot be built
        _say(f"--client native: {exc}")
        return 2
    print(summary_table(result), flush=True)
    if config.json_path is not None:
        write_json(result, config.json_path)
        _say(f"result written to {config.json_path}")
    if config.report_path is not None:
        try:  # the report's plotting library is an extra (`herald[loadtest]`), the node does without it
            from workers.loadtest.report import write_report
        except ImportError as exc:
            _say(f"no report: {exc} (install the loadtest extra: uv sync --extra loadtest, or pip install .[loadtest])")
        else:
            write_report(result, config.report_path)
            _say(f"report written to {config.report_path}")
    return 0 if result["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
