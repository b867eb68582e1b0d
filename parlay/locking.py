"""One writer per folder: a lock that every command writing a run or tournament folder takes.

The lock is an advisory ``flock`` on ``FOLDER/.parlay.lock``, held for as long as the writer
runs; the file says who holds it (host, PID, start time, command). The kernel releases a
``flock`` when its process dies, however it dies, so:

- a second writer while the first runs is refused, with a one-line error naming the holder;
- a file that still names a holder although nobody holds the lock was left by a killed process:
  it is stale and taken over, and the log says so;
- a file that cannot be read, or that names another host (whose processes this machine cannot
  see: a shared disk, a requeued job on another node), is never taken over silently: the error
  says what to check, and ``steal=True`` (``--steal-lock`` on the command line) takes it anyway.

Readers (``parlay report`` of a live run, ``run:DIR@K``) take no run lock; a report takes its own
(``REPORT_LOCK``), so two reports of one run never write its pages at once; a report waits for
another to finish rather than fail (``REPORT_WAIT``), so a run that ends while someone reports
it still writes its own report. A holder empties the file
when it is done, rather than removing it, so no two processes can lock two different files.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".parlay.lock"
REPORT_LOCK = ".parlay-report.lock"
REPORT_WAIT = 300.0
"""Seconds a report waits for another report of the same run to finish."""


class LockError(RuntimeError):
    """Another writer holds the folder, or the lock file cannot be trusted."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    command: str

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host}, since {self.started} ({self.command})"

    @classmethod
    def me(cls) -> Holder:
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), started, " ".join(["parlay", *sys.argv[1:]])[:200])


class FolderLock:
    """``with FolderLock(folder, steal=False):`` — the folder is this process's to write."""

    def __init__(self, folder: str | Path, steal: bool = False, name: str = LOCK_NAME, wait: float = 0.0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.steal = steal
        self.wait = wait
        """Seconds to wait for the holder to finish before refusing (0: refuse at once)."""
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                holder = _describe(_read(fd))
                os.close(fd)
                raise LockError(f"{self.folder} is being written by {holder}; wait for it or stop it first") from None
        try:
            self._check_previous(_read(fd))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(Holder.me())).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing releases the flock
            raise
        self._fd = fd

    def _check_previous(self, text: str) -> None:
        """What the file says of its last holder, now that nobody holds the lock."""
        if not text.strip():
            return  # a clean release, or a new folder
        try:
            holder = Holder(**json.loads(text))
        except (ValueError, TypeError):
            if not self.steal:
                raise LockError(
                    f"{self.path} cannot be read as a parlay lock; make sure no other parlay writes to "
                    f"{self.folder}, then rerun with --steal-lock"
                ) from None
            log.warning("%s: taking over an unreadable lock file (--steal-lock)", self.path)
            return
        if holder.host != socket.gethostname() and not self.steal:
            raise LockError(
                f"{self.folder} was last locked by {holder}, on another host whose processes this machine "
                f"cannot see; if that process is gone, rerun with --steal-lock"
            )
        why = "--steal-lock" if holder.host != socket.gethostname() else "the process is gone"
        log.warning("%s: taking over the lock left by %s (%s)", self.folder, holder, why)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _describe(text: str) -> str:
    try:
        return str(Holder(**json.loads(text)))
    except (ValueError, TypeError):
        return "another process (its lock file does not say which)"
