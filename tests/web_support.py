"""Servers the web tests start and stop: a study server process, and a real PostgreSQL."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(
    args: list[str], ready_url: str, env: dict[str, str] | None = None, timeout: float = 120, log: Path | None = None
):
    """``python ARGS`` in the repository root, once ``ready_url`` answers (any HTTP status); its
    output is appended to ``log`` when given."""
    out = log.open("ab") if log is not None else None
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=out
    )
    if out is not None:
        out.close()  # the child holds its own copy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args} exited with status {proc.returncode} before serving")
        try:
            httpx.get(ready_url, timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{args} did not serve {ready_url} within {timeout} s")


def _postgres_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    assert found, "the PostgreSQL test needs Debian's postgresql (apt-get install postgresql; .ci/run does)"
    return Path(os.path.realpath(found)).parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a free loopback port; yields its SQLAlchemy URL.

    As root (PostgreSQL refuses to run as root) the server runs as the ``postgres`` user that
    Debian's package creates."""
    bindir = _postgres_bin()
    data = Path(tempfile.mkdtemp(prefix="parlay-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)

    try:
        run(str(bindir / "initdb"), "-D", str(data / "db"), "-U", "parlay", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start")
        try:
            yield f"postgresql+psycopg://parlay@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)
