"""The store's data files: one file per artifact, each piece at a fixed offset (index x piece size).

This module only moves bytes: it knows nothing of manifests, hashes or the index. `Store` decides what
is written and marks pieces present in the index (kvnet.store_index) only after `write_group` returned,
that is after the group's bytes are on stable storage (one fdatasync per group).

Files are sparse: a piece not yet written is a hole and takes no disk space, so the bytes the store
holds are the bytes of its present pieces (what capacity and LRU count). A new file's directory entry
is fsynced once, when the file is created.

Writes go through O_DIRECT from page-aligned buffers when the filesystem supports it (measured on this
machine, bench/store_write.py: about 1.3-1.4 GB/s with 2 writer threads against about 0.95 GB/s for
buffered pwrite of the same bytes; the page cache copy and its writeback are what O_DIRECT avoids).
Pieces whose offset or length is not a multiple of the alignment (an artifact's short last piece, or
a piece size that is not a multiple of 4 KiB) and filesystems that refuse O_DIRECT (tmpfs) use plain
pwrite; fdatasync makes both durable, since it flushes the file, not the descriptor.

Every failure is the OS's own OSError; `Store` turns them into StoreError / StoreFullError.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096  # O_DIRECT offset/length/buffer alignment that every Linux filesystem accepts
WRITER_THREADS = 2  # pwrite calls release the GIL; 2 threads measured best on a 2-core machine
Buffer = bytes | bytearray | memoryview


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AlignedBuffers:
    """Reused page-aligned buffers (anonymous mmaps are page aligned), one per writer thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = mmap.mmap(-1, max(size, 1 << 20))
        return buf


class DataFiles:
    """The data/ directory: `<manifest id hex>.kv` per artifact."""

    def __init__(self, root: Path, direct: bool | None = None) -> None:
        """`direct`: use O_DIRECT (True), never (False), or where the filesystem supports it (None)."""
        self.dir = Path(root)
        self._direct = direct
        self._buffers = _AlignedBuffers()
        self._pool: ThreadPoolExecutor | None = None

    def path(self, mid: bytes) -> Path:
        return self.dir / f"{mid.hex()}.kv"

    def ids(self) -> list[bytes]:
        """Manifest ids of the data files on disk (names that are not an id are ignored)."""
        out = []
        for p in self.dir.glob("*.kv"):
            try:
                out.append(bytes.fromhex(p.stem))
            except ValueError:
                continue
        return out

    def size(self, mid: bytes) -> int | None:
        """The file's length (holes included), or None if it does not exist."""
        try:
            return self.path(mid).stat().st_size
        except FileNotFoundError:
            return None

    # -- writing ----------------------------------------------------------------------------------

    def write_group(self, mid: bytes, items: Sequence[tuple[int, Buffer]]) -> None:
        """Write each (offset, bytes) of one artifact, then one fdatasync: when this returns, every
        byte of the group is durable. Raises OSError (ENOSPC for a full disk) with nothing promised."""
        fd, direct_fd = self.open_for_write(mid, direct=self._wants_direct(items))
        try:
            self._write_all(fd, direct_fd, items)
            os.fdatasync(fd)
        finally:
            self.close_fds(fd, direct_fd)

    def open_for_write(self, mid: bytes, direct: bool = True, sync_dir: bool = True) -> tuple[int, int | None]:
        """(a read-write descriptor, an O_DIRECT one or None) of the artifact's data file, created if
        needed (its directory entry made durable at once, unless `sync_dir` is False: then the caller
        must `fsync_dir(self.dir)` before it marks a piece of the file present). Close both with
        `close_fds`."""
        path = self.path(mid)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if created and sync_dir:
                fsync_dir(self.dir)
            return fd, self._open_direct(path) if direct and self._direct is not False else None
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def close_fds(fd: int, direct_fd: int | None) -> None:
        if direct_fd is not None:
            os.close(direct_fd)
        os.close(fd)

    def write_at(self, fd: int, direct_fd: int | None, offset: int, data: Buffer) -> None:
        """Write one piece at `offset`: with O_DIRECT when there is a direct descriptor and the
        offset and length are aligned (from `data` itself if it is a page-aligned buffer, else from
        a copy in this thread's aligned buffer), else with a plain pwrite. Not durable until the
        caller's fdatasync on `fd` (which flushes the file, so it covers both descriptors)."""
        if direct_fd is not None and _aligned(offset, len(data)):
            self._write_direct(direct_fd, offset, data)
        else:
            _pwrite_all(fd, data, offset)

    def write_run(self, fd: int, direct_fd: int | None, offset: int, datas: Sequence[Buffer]) -> None:
        """Write pieces that lie back to back from `offset` (a run of consecutive indices): with one
        O_DIRECT pwritev when every piece is a page-aligned buffer of aligned length (one large
        write instead of several: fewer syscalls, and the disk takes 4 MiB writes faster than 1 MiB
        ones), else piece by piece as `write_at`. Not durable until the caller's fdatasync."""
        if (len(datas) > 1 and direct_fd is not None and _aligned(offset, ALIGN)
                and all(_aligned(0, len(d)) and _is_aligned_buffer(d) for d in datas)):
            _pwritev_all(direct_fd, datas, offset)
            return
        for d in datas:
            self.write_at(fd, direct_fd, offset, d)
            offset += len(d)

    def _wants_direct(self, items: Sequence[tuple[int, Buffer]]) -> bool:
        return self._direct is not False and any(_aligned(off, len(d)) for off, d in items)

    def _open_direct(self, path: Path) -> int | None:
        """An O_DIRECT descriptor, or None where the filesystem refuses it (then remembered)."""
        try:
            return os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL or self._direct:
                raise
            self._direct = False
            return None

    def _write_all(self, fd: int, direct_fd: int | None, items: Sequence[tuple[int, Buffer]]) -> None:
        aligned = [(o, d) for o, d in items if direct_fd is not None and _aligned(o, len(d))]
        buffered = [(o, d) for o, d in items if direct_fd is None or not _aligned(o, len(d))]
        for off, data in buffered:
            _pwrite_all(fd, data, off)
        if not aligned:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="kvnet-store-write")
        for f in [self._pool.submit(self._write_direct, direct_fd, off, data) for off, data in aligned]:
            f.result()  # re-raises the first OSError

    def _write_direct(self, fd: int, off: int, data: Buffer) -> None:
        """Write from `data` itself if it is page aligned (a receiver's aligned buffer), else from a
        copy in this thread's aligned buffer."""
        if _is_aligned_buffer(data):
            _pwrite_all(fd, data, off)
            return
        buf = self._buffers.get(len(data))
        with memoryview(buf) as whole:
            view = whole[:len(data)]
            view[:] = data
            _pwrite_all(fd, view, off)
            view.release()

    # -- reading and removing ---------------------------------------------------------------------

    def read(self, mid: bytes, offset: int, size: int) -> bytearray:
        """`size` bytes at `offset`, or fewer if the file ends first (a truncated file).
        FileNotFoundError if the file is gone."""
        data = bytearray(size)
        fd = os.open(self.path(mid), os.O_RDONLY)
        try:
            got = 0
            with memoryview(data) as view:
                while got < size:
                    n = os.preadv(fd, [view[got:]], offset + got)
                    if n == 0:
                        break
                    got += n
        finally:
            os.close(fd)
        del data[got:]
        return data

    def remove(self, mid: bytes) -> None:
        self.path(mid).unlink(missing_ok=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _aligned(offset: int, length: int) -> bool:
    return length > 0 and offset % ALIGN == 0 and length % ALIGN == 0


def _is_aligned_buffer(data: Buffer) -> bool:
    """Whether a writable buffer starts on an ALIGN boundary (read-only ones, like bytes, cannot be
    asked for their address without a copy, so they count as unaligned)."""
    try:
        with memoryview(data) as view:
            if view.readonly or not view.c_contiguous:
                return False
            return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0
    except (TypeError, ValueError, BufferError):
        return False


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """pwrite until every byte is written (a pwrite may write fewer bytes than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pwritev_all(fd: int, datas: Sequence[Buffer], offset: int) -> None:
    """pwritev until every byte is written (a short write continues from where it stopped, which
    stays aligned for O_DIRECT since the kernel writes whole blocks)."""
    views = [memoryview(d).cast("B") for d in datas]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
