"""``make upgrade-check``: would Herald still pass with the newest versions its ranges allow?

``uv.lock`` pins what ``make test`` runs against; a fresh ``pip install
herald`` resolves the newest versions ``pyproject.toml`` allows instead. This
finds the drift before users do, without touching the checkout:

1. copies the project's files (tracked, or new and not ignored) to a
   throwaway directory;
2. re-locks them there with ``uv lock --upgrade`` (``--resolution`` to try
   the other end of the ranges: ``lowest-direct``);
3. prints every package that moved, came or went;
4. installs the new lock into the copy's own venv and runs lint, types and
   the whole suite there; a new uvicorn is added to the copy's
   ``api.adapter.TESTED_UVICORN``, so that every node of the suite tries
   Herald's adapter on it (as adopting it would) rather than stand aside;
5. prints which step failed and its first lines; the full logs stay in
   ``.run/upgrade-check/`` (the copy is removed unless ``--keep``).

Exit status 0 when every step passed, 1 otherwise. Adopting the new
versions is then deliberate: ``make lock``, ``make test`` (docs/development.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".run" / "upgrade-check"
SHOWN_LINES = 25


@dataclass
class Step:
    name: str
    command: list[str]
    ok: bool = False
    seconds: float = 0.0
    summary: str = ""


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(name for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


def copy_project(into: Path) -> None:
    """The project's files, and a git index of them (``tests/ops/test_packaging.py`` lists files through git)."""
    for name in project_files():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, into / name)
    subprocess.run(["git", "init", "-q"], cwd=into, check=True)
    subprocess.run(["git", "add", "-A"], cwd=into, check=True)


def locked(lock: Path) -> dict[str, str]:
    packages = tomllib.loads(lock.read_text())["package"]
    return {p["name"]: str(p["version"]) for p in packages if "version" in p and p["name"] != "herald"}


def moved(before: dict[str, str], after: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        lines.append(f"  {name}: {old or '(new)'} -> {new or '(gone)'}")
    return lines


TESTED_LINE = "TESTED_UVICORN: tuple[str, ...] = ("


def try_adapter_on(copy: Path, version: str) -> bool:
    """Add ``version`` to the copy's tested uvicorn releases; whether it was new to them."""
    gate = copy / "api" / "adapter" / "__init__.py"
    text = gate.read_text()
    start = text.index(TESTED_LINE) + len(TESTED_LINE)
    if f'"{version}"' in text[start : text.index(")", start)]:
        return False
    gate.write_text(f'{text[:start]}"{version}", {text[start:]}')
    return True


def summarize(name: str, output: str) -> str:
    """The lines of a failed step worth reading first: pytest's failures, or the tool's own last lines."""
    lines = output.splitlines()
    if name == "tests":
        failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
        tail = [line for line in lines[-3:] if " passed" in line or " failed" in line or " error" in line]
        return "\n".join([*failed[:SHOWN_LINES], *tail])
    return "\n".join(lines[-SHOWN_LINES:])


def run(step: Step, cwd: Path, env: dict[str, str]) -> Step:
    print(f"-- {step.name}: {' '.join(step.command)}", flush=True)
    started = time.monotonic()
    log = LOGS / f"{step.name}.log"
    with log.open("w") as out:
        done = subprocess.run(step.command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    step.seconds = time.monotonic() - started
    step.ok = done.returncode == 0
    step.summary = "" if step.ok else summarize(step.name, log.read_text(errors="replace"))
    print(f"   {'ok' if step.ok else 'FAILED'} in {step.seconds:.0f} s (log: {log.relative_to(ROOT)})", flush=True)
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description="Would Herald still pass with the newest versions its ranges allow?")
    parser.add_argument("--uv", default=str(ROOT / ".tools" / "bin" / "uv"), help="the uv to use (make's own)")
    parser.add_argument("--python", default="python3", help="the interpreter for the throwaway venv")
    parser.add_argument("--resolution", default="highest", choices=["highest", "lowest-direct"])
    parser.add_argument("--no-tests", action="store_true", help="lint and types only (minutes less)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway copy (its path is printed)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -k resume)")
    args = parser.parse_args()
    uv = str(Path(args.uv).resolve())  # the steps run in the copy

    LOGS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="herald-upgrade-check-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "REDIS_", "VIRTUAL_ENV"))}
    env |= {"UV_PYTHON_DOWNLOADS": "never", "UV_PROJECT_ENVIRONMENT": str(work / ".venv")}
    steps: list[Step] = []
    try:
        copy_project(work)
        relock = Step("lock", [uv, "lock", "--upgrade", "--resolution", args.resolution, "--python", args.python])
        steps.append(run(relock, work, env))
        changes = moved(locked(ROOT / "uv.lock"), locked(work / "uv.lock")) if relock.ok else []
        print(f"\nversions that moved against uv.lock ({args.resolution}):")
        print("\n".join(changes) if changes else "  none: uv.lock already has them")
        print()
        if relock.ok:
            uvicorn = locked(work / "uv.lock")["uvicorn"]
            if try_adapter_on(work, uvicorn):
                print(f"uvicorn {uvicorn} is new to the adapter: the suite tries the adapter on it\n")
            venv = work / ".venv" / "bin"
            plan = [
                Step(
                    "install", [uv, "sync", "--frozen", "--extra", "loadtest", "--python", args.python]
                ),  # the lock just made
                Step("lint", [str(venv / "ruff"), "check", "."]),
                Step("format", [str(venv / "ruff"), "format", "--check", "."]),
                Step("types", [str(venv / "mypy")]),
            ]
            if not args.no_tests:
                plan.append(Step("tests", [str(venv / "python"), "-m", "pytest", "-q", "-rfE", *args.pytest_args]))
            for step in plan:
                steps.append(run(step, work, env))
                if step.name == "install" and not step.ok:
                    break
    finally:
        if args.keep:
            print(f"the throwaway copy: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print("\n== upgrade-check:", "all passed" if all(s.ok for s in steps) else "FAILED")
    for step in steps:
        print(f"  {step.name:8} {'ok' if step.ok else 'FAILED'}  {step.seconds:6.0f} s")
    for step in steps:
        if not step.ok:
            print(f"\n-- {step.name} failed:\n{step.summary}")
    return 0 if steps and all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
