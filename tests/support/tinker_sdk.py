"""Pinned releases of the official Tinker SDK, each run unmodified in a child process.

Each release is installed once with `pip install --no-deps --target .cache/tinker-sdk/VERSION`
(its dependencies are in the dev environment; BIOS_TINKER_WHEELS names a wheel directory for
offline installs). A child runs one scenario of tests/server/sdk_side.py (or of another side
script, with more pinned directories on its path: cookbook_release.py) and prints what it saw as
one line of JSON; the tests make every assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SDK_RELEASES = ("0.38.0", "0.33.1")
REPO = Path(__file__).resolve().parents[2]
SDK_SIDE = REPO / "tests" / "server" / "sdk_side.py"


def pinned_directory(name: str, *requirements: str) -> Path:
    """The directory `name` of the SDK cache, holding `requirements` (pinned `pip` specifiers)
    installed with `--no-deps` on first use. The directory appears whole or not at all."""
    root = Path(os.environ.get("BIOS_TINKER_SDK_CACHE", REPO / ".cache" / "tinker-sdk"))
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=root, prefix=f".{name}.")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
        staging,
        *requirements,
    ]
    if os.environ.get("BIOS_TINKER_WHEELS"):
        command += ["--no-index", "--find-links", os.environ["BIOS_TINKER_WHEELS"]]
    subprocess.run(command, check=True, timeout=600)
    try:
        os.rename(staging, target)
    except OSError:  # installed meanwhile by a concurrent run
        shutil.rmtree(staging, ignore_errors=True)
    return target


def sdk_directory(version: str) -> Path:
    """A directory holding the `tinker` package of `version`, installed on first use."""
    return pinned_directory(version, f"tinker=={version}")


def start_child(script: Path, path: list[Path], scenario: str, **arguments: object) -> subprocess.Popen:
    """Start `scenario` (a function of `script`) in a child process whose PYTHONPATH is `path`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, path)),
        "HF_HUB_OFFLINE": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(script), scenario, json.dumps(arguments)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_sdk(version: str, scenario: str, **arguments: object) -> subprocess.Popen:
    """Start `scenario` (a function of sdk_side.py) with SDK `version` in a child process."""
    return start_child(SDK_SIDE, [sdk_directory(version)], scenario, **arguments)


def sdk_result(child: subprocess.Popen, timeout: float = 600) -> dict:
    """What the scenario of `child` (from `start_sdk`) saw, once it has ended successfully."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
    assert child.returncode == 0, f"the child failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def run_sdk(version: str, scenario: str, **arguments: object) -> dict:
    """Run `scenario` with SDK `version` in a child process: what it saw."""
    return sdk_result(start_sdk(version, scenario, **arguments))
