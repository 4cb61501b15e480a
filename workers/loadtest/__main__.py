"""``python -m workers.loadtest``: run, print the summary, write ``--json`` and ``--report``.

Exit status: 0 when every accepted event reached every subscriber exactly
once and in order, 1 when not (the summary says why), 2 for bad options.
"""

from __future__ import annotations

import sys

from workers.loadtest import native
from workers.loadtest.config import from_args
from workers.loadtest.report import write_report
from workers.loadtest.results import summary_table, write_json
from workers.loadtest.runner import run


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    config = from_args(argv)
    if config.client == "native":
        try:
            native.build()
        except native.NativeUnavailable as exc:
            _say(f"--client native: {exc}")
            return 2
    try:
        import uvloop

        result = uvloop.run(run(config, _say))
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        import asyncio

        result = asyncio.run(run(config, _say))
    print(summary_table(result), flush=True)
    if config.json_path is not None:
        write_json(result, config.json_path)
        _say(f"result written to {config.json_path}")
    if config.report_path is not None:
        write_report(result, config.report_path)
        _say(f"report written to {config.report_path}")
    return 0 if result["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
