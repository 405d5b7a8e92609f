"""A model server that dpokit starts for one stage and stops afterwards (`openai.server_command`).

    with serve("vllm serve {policy} --port {port}", "runs/x/round-1/merged", "http://127.0.0.1:{port}/v1",
               Path("runs/x/round-2/server-generation.log"), startup_timeout_s=600) as url:
        ...  # requests to url

The command is split like a shell would (no shell runs it), {policy} and {port} are filled in per argument
(so a path with spaces stays one argument), and it runs in its own process group with its output in the log
file. `serve` polls URL/models until the server answers; if the process exits first, or the wait runs out,
it stops with a one-line error quoting the last lines of that output. On leaving, the whole group gets
SIGTERM, then SIGKILL if it is still there after a grace period.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpokit.errors import DpokitError
from dpokit.online.config import fill

POLL_S = 0.25  # between two probes of a starting server
PROBE_TIMEOUT_S = 5.0  # one probe
STOP_GRACE_S = 15.0  # between SIGTERM and SIGKILL
TAIL_LINES = 5  # lines of the server's output quoted in an error


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(log: Path, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of a log file on one line, ' | '-separated."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"


def _answers(url: str) -> bool:
    """Whether the server answers GET URL/models: any HTTP reply but 503 (llama.cpp's 'still loading')."""
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError as error:
        return error.code != 503
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after the grace period; reaps the process."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


@contextmanager
def serve(command: str, policy: str, url: str, log: Path, startup_timeout_s: float) -> Iterator[str]:
    """Run `command` serving `policy`, wait until it answers at `url`, yield the URL (ports filled in) and stop
    it afterwards, whatever happens inside the block."""
    values = {"policy": policy, "port": str(free_port())}
    argv = [fill(part, values) for part in shlex.split(command)]
    url = fill(url, values).rstrip("/")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as output:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            raise DpokitError(f"openai.server_command: cannot run {argv[0]!r} ({error.strerror})") from None
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _answers(url):
            if process.poll() is not None:
                raise DpokitError(
                    f"openai.server_command exited with code {process.returncode} before answering at {url}; "
                    f"its last output ({log}): {tail(log)}"
                )
            if time.monotonic() > deadline:
                raise DpokitError(
                    f"openai.server_command: no answer at {url}/models within {startup_timeout_s:g}s "
                    f"(startup_timeout_s); its last output ({log}): {tail(log)}"
                )
            time.sleep(POLL_S)
        yield url
    finally:
        _stop(process)
