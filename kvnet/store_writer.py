"""Durable group writes of one artifact's verified pieces, fed from any thread, off any event loop.

Why it exists: a fetch receives pieces in threads (one bulk receiver per provider connection). Before,
every piece went from its receiver thread to the trio loop, through a memory channel to a writer task,
and from there, a group at a time, through the store worker (`Store.put_pieces`): the receiver waited
on a trio round trip per piece, and the group's writes, its fdatasync and its commit ran one group
after another (docs/benchmarks.md, "Bulk path": the writer was busy ~90% of a fetch). A GroupWriter
takes pieces from any thread through a bounded `queue.Queue` (its backpressure blocks the receiver
thread, not an event loop), writes each at its offset in the artifact's data file in WRITER_THREADS
threads (O_DIRECT from page-aligned buffers, kvnet.store_files; consecutive pieces that are queued
together go out as one pwritev, so a disk that falls behind gets larger writes), and a committer thread makes every
group durable with one fdatasync and marks it present with one transaction on its own SQLite
connection (WAL), while the writer threads keep writing the next pieces.

The durability rule is the store's (kvnet.store): a piece is marked present only after its bytes are
on stable storage, and the fdatasync of a group starts only after every write of that group returned.
A process killed at any point leaves at worst written but unmarked bytes, which the next fetch
overwrites. Only group completions are reported (`on_commit`, called from the committer thread), so a
caller on an event loop sees one wake-up per group, not one per piece.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvnet.pieces import ArtifactError
from kvnet.store import NotFoundError, Store, StoreError, StoreFullError
from kvnet.store_files import fsync_dir
from kvnet.store_index import StoreIndex

log = logging.getLogger("kvnet.store")
GROUP = 16  # pieces per fdatasync and index commit
# Writer threads mostly wait on the device (their CPU is ~0.05-0.08 s per 256 MiB fetched): 4 keep more
# O_DIRECT writes in flight than 2 (bench/transfer.py on 2 shared cores: 1 provider 500-707 MB/s with
# 4 against 388-474 with 2; 3 providers 358-401 against 283-325).
WRITER_THREADS = 4
# A writer takes up to this many queued pieces at once and writes each run of consecutive ones with
# one O_DIRECT pwritev (the disk takes 4 MiB writes faster than 1 MiB ones: bench/store_write.py).
COALESCE = 4
QUEUE_PIECES = 32  # pieces waiting to be written (bounds memory: 32 MiB with 1 MiB pieces)
IDLE_COMMIT_S = 0.05  # the committer looks at least this often: written pieces wait at most this long
POLL_S = 0.1  # how often a blocked submit looks whether the writer was closed or failed

Buffer = bytes | bytearray | memoryview


class WriterClosedError(StoreError):
    """A piece was submitted to a group writer that is closed or has failed (not stored)."""


@dataclass(frozen=True)
class Written:
    """One piece made durable and marked present; `tag` is what the submitter passed with it."""

    index: int
    size: int
    tag: Any


class GroupWriter:
    """Writes verified pieces of one artifact durably in groups; thread safe. Made by
    `Store.group_writer`; `close()` it when done (it commits what was written)."""

    def __init__(self, store: Store, mid: bytes, *, group: int = GROUP, threads: int = WRITER_THREADS,
                 queue_pieces: int = QUEUE_PIECES, on_commit: Callable[[list[Written]], None] | None = None,
                 on_written: Callable[[int, Buffer], None] | None = None,
                 on_failure: Callable[[Exception], None] | None = None) -> None:
        """`on_commit(pieces)`: called from the committer thread after each group is durable and
        marked present. `on_written(index, buffer)`: called from a writer thread once a piece's buffer is
        no longer needed for the store (after its pwrite), so a receiver can use it (build the KV from
        it off the receiving thread) and reuse it. `on_failure(error)`: called once,
        from the failing thread, when a write or commit failed (nothing after it is stored)."""
        if store.read_only:
            raise StoreError(f"the store at {store.root} is open read-only")
        self.mid = mid
        self._m = store.get_manifest(mid).manifest
        self._files = store.files
        self._have = set(store.present_pieces(mid))
        self.group, self.on_commit, self.on_written, self.on_failure = group, on_commit, on_written, on_failure
        try:
            # the new file's directory entry is made durable by the first commit, in the committer
            # thread: an fsync of the directory took ~10 ms, before the fetch could ask for a piece
            self._fd, self._direct_fd = store.files.open_for_write(mid, sync_dir=False)
        except OSError as exc:
            raise _store_error(exc, mid, store.files.path(mid)) from exc
        try:
            self._index = StoreIndex.open_writable(store.root / "index.sqlite")
        except sqlite3.Error as exc:
            store.files.close_fds(self._fd, self._direct_fd)
            raise StoreError(f"cannot open the store index in {store.root}: {exc}") from exc
        self._q: queue.Queue = queue.Queue(queue_pieces)
        self._cond = threading.Condition()  # guards _written, _flush, _closing and the two counts
        self._written: list[Written] = []
        self._submitted = 0  # pieces queued so far
        self._writes_done = 0  # of those, pieces whose write returned (or failed)
        self._flush = False
        self._closing = False
        self._closed = False
        self.failure: Exception | None = None
        self.committed = 0  # pieces made durable and marked present
        self._dir_synced = False
        # seconds spent (wall, and CPU of the writer threads), and the number of groups: for benchmarks
        self.timers = {"pwrite": 0.0, "writer_cpu": 0.0, "fdatasync": 0.0, "commit": 0.0, "groups": 0,
                       "committer_cpu": 0.0, "writes": 0}
        self._timer_lock = threading.Lock()
        self._writers = [threading.Thread(target=self._write_loop, daemon=True, name=f"kvnet-group-write-{n}")
                         for n in range(threads)]
        self._committer = threading.Thread(target=self._commit_loop, daemon=True, name="kvnet-group-commit")
        for t in (*self._writers, self._committer):
            t.start()

    # -- the submitting side (any thread) ---------------------------------------------------------

    def submit(self, index: int, data: Buffer, tag: Any = None) -> bool:
        """Queue piece `index` (already verified against the manifest by the caller) for writing;
        blocks while QUEUE_PIECES pieces wait (the writers' backpressure). False if the piece is
        already present (nothing queued); WriterClosedError if the writer was closed or failed."""
        if not 0 <= index < len(self._m.pieces) or len(data) != self._m.piece_len(index):
            raise ArtifactError(f"piece {index}: {len(data)} bytes do not fit the manifest")
        if index in self._have:
            return False
        with self._cond:
            self._submitted += 1
        try:
            while True:
                if self.failure is not None:
                    raise WriterClosedError(f"the store write failed: {self.failure}") from self.failure
                if self._closing:
                    raise WriterClosedError("the group writer is closed")
                try:
                    self._q.put((index, data, tag), timeout=POLL_S)
                    return True
                except queue.Full:
                    continue
        except BaseException:
            with self._cond:
                self._submitted -= 1
            raise

    def flush(self) -> None:
        """From now on, commit as soon as every submitted piece is written, without waiting for a
        full group (the caller has submitted the last piece it expects)."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def close(self) -> None:
        """Write and commit everything submitted, stop the threads, release the file and the index
        connection. Raises the failure (a StoreError) if a write or commit failed. Idempotent."""
        if self._closed:
            return
        self._closing = True
        for _ in self._writers:
            self._q.put(None)
        for t in self._writers:
            t.join()
        with self._cond:
            self._cond.notify_all()
        self._committer.join()
        self._closed = True
        self._files.close_fds(self._fd, self._direct_fd)
        self._index.close()
        if self.failure is not None:
            raise self.failure

    # -- the writer threads -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        spent, cpu0, stop, writes = 0.0, time.thread_time(), False, 0
        while not stop:
            batch, stop = self._take()
            if not batch:
                continue
            if self.failure is None:
                t0 = time.perf_counter()
                try:
                    writes += self._write_runs(batch)
                except OSError as exc:
                    self._fail(_store_error(exc, self.mid, self._files.path(self.mid)))
                spent += time.perf_counter() - t0
            sizes = [(index, len(data), tag) for index, data, tag in batch]
            for index, data, _ in batch:
                self._release(index, data)
            with self._cond:
                self._writes_done += len(batch)
                if self.failure is None:
                    self._written.extend(Written(index, size, tag) for index, size, tag in sizes)
                if self._due():
                    self._cond.notify_all()
        with self._timer_lock:
            self.timers["pwrite"] += spent
            self.timers["writer_cpu"] += time.thread_time() - cpu0
            self.timers["writes"] += writes

    def _take(self) -> tuple[list[tuple[int, Buffer, Any]], bool]:
        """The next piece (waiting for one) and up to COALESCE - 1 more already queued; True once the
        end sentinel was taken (the loop stops after writing what it took)."""
        item = self._q.get()
        if item is None:
            return [], True
        batch = [item]
        while len(batch) < COALESCE:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _write_runs(self, batch: list[tuple[int, Buffer, Any]]) -> int:
        """Write a batch as runs of consecutive indices, one write call per run; returns the runs."""
        piece_size = self._m.piece_size
        run: list[tuple[int, Buffer, Any]] = []
        runs = 1
        for item in sorted(batch, key=lambda it: it[0]):
            if run and item[0] != run[-1][0] + 1:
                self._write_run(run, piece_size)
                run, runs = [], runs + 1
            run.append(item)
        self._write_run(run, piece_size)
        return runs

    def _write_run(self, run: list[tuple[int, Buffer, Any]], piece_size: int) -> None:
        self._files.write_run(self._fd, self._direct_fd, run[0][0] * piece_size, [d for _, d, _ in run])

    def _release(self, index: int, data: Buffer) -> None:
        if self.on_written is not None:
            try:
                self.on_written(index, data)
            except Exception:  # a caller's buffer pool must not stop the writer
                log.exception("on_written callback failed")

    # -- the committer thread ---------------------------------------------------------------------

    def _due(self) -> bool:
        """Whether the committer should commit now (called holding the condition)."""
        return (len(self._written) >= self.group or self._closing
                or (self._flush and bool(self._written) and self._writes_done == self._submitted))

    def _commit_loop(self) -> None:
        cpu0 = time.thread_time()
        try:
            self._commit_groups()
        finally:
            self.timers["committer_cpu"] += time.thread_time() - cpu0

    def _commit_groups(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._due, timeout=IDLE_COMMIT_S)
                batch, self._written = self._written, []
                done = self._closing and not any(t.is_alive() for t in self._writers)
            if batch and self.failure is None:
                self._commit(batch)
            if done:
                with self._cond:  # anything the last writer appended before it exited
                    batch, self._written = self._written, []
                if batch and self.failure is None:
                    self._commit(batch)
                return

    def _commit(self, batch: list[Written]) -> None:
        """fdatasync (every write of `batch` has returned), then mark the group present."""
        t0 = time.perf_counter()
        try:
            if not self._dir_synced:  # the file's directory entry, before any of its pieces is marked
                fsync_dir(self._files.dir)
                self._dir_synced = True
            os.fdatasync(self._fd)
        except OSError as exc:
            self._fail(_store_error(exc, self.mid, self._files.path(self.mid)))
            return
        t1 = time.perf_counter()
        try:
            self._index.mark_present(self.mid, [(w.index, w.size) for w in batch])
        except sqlite3.Error as exc:
            self._fail(_index_error(exc, self.mid))
            return
        t2 = time.perf_counter()
        self.timers["fdatasync"] += t1 - t0
        self.timers["commit"] += t2 - t1
        self.timers["groups"] += 1
        self._have.update(w.index for w in batch)
        self.committed += len(batch)
        if self.on_commit is not None:
            try:
                self.on_commit(batch)
            except Exception:  # the pieces are stored; a caller's bug must not stop later commits
                log.exception("on_commit callback failed")

    def _fail(self, exc: Exception) -> None:
        with self._cond:
            first = self.failure is None
            if first:
                self.failure = exc
            self._cond.notify_all()
        if first and self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:
                log.exception("on_failure callback failed")


def _store_error(exc: OSError, mid: bytes, path: os.PathLike) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(f"disk full while writing pieces of {mid.hex()[:16]}; nothing more was stored")
    return StoreError(f"cannot write {path}: {exc.strerror or exc}")


def _index_error(exc: sqlite3.Error, mid: bytes) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        return NotFoundError(f"manifest {mid.hex()[:16]} was removed while its pieces were written")
    if "full" in str(exc):
        return StoreFullError(f"disk full while marking pieces of {mid.hex()[:16]} present: {exc}")
    return StoreError(f"index error while marking pieces of {mid.hex()[:16]} present: {exc}")
