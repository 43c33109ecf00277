"""One node per data dir: an exclusive `flock` on <data_dir>/node.lock, held for the process's life.

Why flock and not a pid file: the kernel drops the lock when the process dies, SIGKILL included, so a
crashed node never leaves a stale lock that blocks the next start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kvnet.errors import KvnetError

LOCK_NAME = "node.lock"


class DataDirLocked(KvnetError):
    """Another kvnet-node runs on this data dir."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock or raise `DataDirLocked` naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DataDirLocked(f"another kvnet-node (pid {holder}) is running on {self.path.parent}; "
                                "stop it first or give this node its own data_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
