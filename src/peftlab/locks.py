"""One lock per run folder, so that two processes (two study runners, a runner and a
`peftlab train`) never write the same run.

An advisory `flock` on `RUN/.lock`: the kernel grants it to one process at a time and drops it
when the holder dies, however it dies, so there is no stale lock to detect and no pid to
trust (a lock file naming a pid was taken over while its writer was between creating and
filling it, and skipped forever once the pid had been reused). The file also records who
holds it (host, pid, start), for messages. The holder removes it on release; a process that
locked a file that was removed meanwhile sees that its inode is no longer the path's, and
tries again. On a shared cluster folder this needs a file system with working `flock` (NFS
with lockd, Lustre mounted with `flock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {since})"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[dict[str, Any] | None]:
    """Hold the run folder's lock: yields None while held, or, when another process holds
    it, that holder's record (possibly empty: a holder between locking and writing it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield read_holder(path) or {}
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file after we opened it: again
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        yield None
    finally:
        Path(path).unlink(missing_ok=True)  # while still holding it, then release
        os.close(fd)
