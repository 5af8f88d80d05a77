"""Start a server in a subprocess and wait until it answers: for tests, benchmarks and notebooks.

`shipyard serve --port 0` binds a free port and prints `shipyard serving on http://HOST:PORT`
before it loads the models; `start_server` reads that line, then polls a readiness route.

Example::

    from shipyard.serve.launch import serve_command, served
    with served(serve_command("runs/digits/package")) as url:
        httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [...]})
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NoReturn

import httpx

from shipyard.serve.settings import ServeError

# The address a server prints on its first line (shipyard's, or any that prints its URL).
ADDRESS = re.compile(r"http://(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d+")
READY_PATH = "/v2/health/ready"


def serve_command(*args: str) -> list[str]:
    """`shipyard serve ARGS --port 0` with this interpreter."""
    return [sys.executable, "-m", "shipyard", "serve", *args, "--port", "0"]


def start_server(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    ready_path: str = READY_PATH,
    any_answer: bool = False,
    timeout_s: float = 120.0,
    capture_stderr: bool = True,
) -> tuple[subprocess.Popen[str], str]:
    """Run `cmd`, read the URL it prints, and return (process, URL) once `ready_path` answers 200
    (with `any_answer`, once it answers at all). ServeError, with the tail of the server's stderr,
    when it exits or is not ready within `timeout_s`; the process is killed then.

    Nothing the server writes can block it: stderr goes to a temporary file (the access log
    writes a line per request), and stdout after the address line is read and dropped.
    """
    # a file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it
    log: IO[str] | None = None
    if capture_stderr:
        # it lives on as proc.stderr: _fail reads its tail, stop_server closes it
        log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=log if log is not None else subprocess.DEVNULL,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except BaseException:
        if log is not None:
            log.close()
        raise
    proc.stderr = log
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = ADDRESS.search(line)
    if match is None:
        _fail(proc, f"the server printed no address (first line: {line.strip()[:200]!r})")
    # whatever the server prints later is read and dropped, so a full pipe never blocks it
    stdout, proc.stdout = proc.stdout, None
    threading.Thread(target=_drain, args=(stdout,), daemon=True, name="server-stdout").start()
    url = match.group(0)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10) as client:
        while True:
            try:
                answer = client.get(url + ready_path)
                if any_answer or answer.status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                _fail(proc, f"the server at {url} exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                _fail(proc, f"the server at {url} was not ready within {timeout_s:g}s")
            time.sleep(0.05)


@contextmanager
def served(cmd: Sequence[str], **options: object) -> Iterator[str]:
    """`start_server(cmd, **options)` as a context manager: yields the URL, then stops the
    server (SIGTERM, then SIGKILL after 60 s)."""
    proc, url = start_server(cmd, **options)  # type: ignore[arg-type]
    try:
        yield url
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> int:
    """SIGTERM, wait (SIGKILL after `timeout_s`); the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def _drain(stream: IO[str]) -> None:
    with stream:
        for _ in stream:
            pass


def _fail(proc: subprocess.Popen[str], why: str) -> NoReturn:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    stderr = ""
    if proc.stderr is not None:
        size = os.fstat(proc.stderr.fileno()).st_size
        tail = os.pread(proc.stderr.fileno(), 2000, max(0, size - 2000))
        stderr = tail.decode(errors="replace")
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    raise ServeError(f"{why}{': ' + stderr.strip() if stderr.strip() else ''}")
