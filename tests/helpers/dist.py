"""Run a test script in its own process group of processes, with a hard timeout, and the environment
it needs to import the test helpers and the examples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
SCRIPTS = TESTS / "scripts"
# A child process's import path: the folders pytest's ``pythonpath`` gives the tests (``helpers.*``, and ``gpt``
# from the examples), then the checkout, so that a script imports its ``lightning_rannc`` even if another copy
# is installed.
CHILD_PATH = (TESTS, ROOT / "examples", ROOT)


def script_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``CHILD_PATH`` prepended to ``PYTHONPATH``
    (an existing ``PYTHONPATH`` is kept after it): the environment for a script started as a subprocess."""
    env = dict(os.environ if base is None else base)
    path = [str(folder) for folder in CHILD_PATH]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def run_script(
    name: str | Path, *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scripts/<name>`` (or a path); kill every rank it started if it outlives ``timeout``.
    With ``check``, a non-zero exit fails the test; without, the caller inspects ``returncode``."""
    env = script_env({k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")})
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / name if isinstance(name, str) else name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # Lightning's launcher starts ranks in our session: kill them all
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{name} {args} timed out after {timeout}s:\n{output[-4000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {args} failed with exit code {proc.returncode}:\n{output[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")
