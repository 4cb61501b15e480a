"""What `make run`, `make test` and the Docker image install is uv.lock, and uv itself is pinned with hashes.

A fresh install once resolved the newest version of every open range, and
`make test` failed on a clean clone (issue: "A fresh clone fails make
test"). These pin the wiring that prevents it: the lock is installed with
``--locked`` everywhere, uv comes from a hashed requirement, and the pins
agree with each other.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from ops.launch import ROOT


def locked() -> dict[str, Version]:
    packages = tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    return {p["name"]: Version(p["version"]) for p in packages if "version" in p}


def test_make_installs_the_lock_and_refuses_a_stale_one() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\t\$\(UV\) sync --locked --extra loadtest --python \$\(PYTHON\)$", makefile, flags=re.M)
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs, "uv itself is installed by pip"
    assert all("--require-hashes --no-deps -r ops/uv-requirements.txt" in line for line in installs), installs


def test_the_image_installs_the_same_lock_without_the_dev_tools() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN uv sync --locked --no-dev" in dockerfile
    assert "COPY pyproject.toml uv.lock" in dockerfile
    assert "--require-hashes --no-deps -r ops/uv-requirements.txt" in dockerfile


def test_the_image_ships_the_node_only_and_the_node_never_needs_plotly() -> None:
    """plotly (the load tool's report) is an extra: not a dependency of the node, not in its image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(Requirement(r).name == "plotly" for r in project["dependencies"])
    assert [Requirement(r).name for r in project["optional-dependencies"]["loadtest"]] == ["plotly"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--extra" not in dockerfile
    assert "--all-extras" not in dockerfile
    assert "COPY workers ./workers" not in dockerfile  # not the load tool nor the bench
    # The node's whole import graph, in a fresh interpreter: plotly stays out.
    code = "import sys, api.app, api.__main__, workers.demo, workers.produce; print('plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_uv_is_pinned_with_hashes_at_the_version_ops_uv_in_names() -> None:
    wanted = next(line for line in (ROOT / "ops" / "uv.in").read_text().splitlines() if line.startswith("uv=="))
    compiled = (ROOT / "ops" / "uv-requirements.txt").read_text()
    assert re.search(rf"^{re.escape(wanted)} \\$", compiled, flags=re.M)
    assert compiled.count("--hash=sha256:") >= 10  # a wheel per platform, each with its hash


def test_every_range_in_pyproject_admits_the_locked_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    versions = locked()
    requirements = [*project["project"]["dependencies"], *project["dependency-groups"]["dev"]]
    for line in requirements:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in versions, f"{name} is not in uv.lock"
        assert requirement.specifier.contains(versions[name]), f"{line}: uv.lock has {versions[name]}"


def test_the_lock_resolves_every_platform_herald_runs_on() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert lock["requires-python"] == ">=3.11"
    uvloop = next(p for p in lock["package"] if p["name"] == "uvloop")
    wheels = [w["url"] for w in uvloop["wheels"]]
    assert any("manylinux" in url and "x86_64" in url for url in wheels)
    assert any("manylinux" in url and "aarch64" in url for url in wheels)
