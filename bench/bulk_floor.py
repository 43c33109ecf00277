"""The floor of the bulk path: the same stages as a durable bulk fetch, in one minimal script, each
timed in CPU seconds per GiB, so that `bench/transfer.py --breakdown` can be read against it.

    .venv/bin/python -m bench.bulk_floor --mb 256 --runs 3 [--mode tcp|tls] [--writers 2] [--no-store]

A sender process (the provider's part) sends a file that is in the page cache as records of the bulk
wire (a 12-byte header per 1 MiB piece): over plain TCP with `socket.sendfile`, over TLS 1.3 read
into one reused buffer and `sendall` (user-space encryption). The receiver (the fetcher's part, this
process) reads each header and piece into a reused page-aligned buffer (recv_into), hashes it
(BLAKE3), hands it through a bounded queue to writer threads that write it with O_DIRECT at its
offset in one preallocated-by-nothing (sparse) file, and a committer makes every group of 16 pieces
durable with one fdatasync and one SQLite (WAL, synchronous=FULL) transaction. No manifest, no
libp2p, no trio, no checks beyond the hash: what is left is what the parts cost.

CPU seconds are `time.thread_time` per stage (valid on a loaded machine: they count only the CPU a
thread got), and the sender's and receiver's process CPU (user + system); MB/s is wall-clock and only
meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import socket
import sqlite3
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parents[1]
PIECE = 1 << 20
GROUP = 16
HEADER = struct.Struct(">B3sII")
GIB = 1 << 30
WRITERS = 2  # O_DIRECT writer threads by default (the prototype)

SENDER = r"""
import os, socket, ssl, struct, sys, time, resource
sys.path.insert(0, sys.argv[4])
HEADER = struct.Struct(">B3sII")
path, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(path)
piece = 1 << 20
if mode == "tls":  # the context (and its imports) before the receiver's clock starts
    from kvnet.p2p.bulk_server import make_tls_context
    ctx, _ = make_tls_context()
    if sys.argv[5] != "product":
        from kvnet.p2p.bulk_wire import prefer_aes128_gcm
        assert prefer_aes128_gcm(ctx, sys.argv[5].encode())
srv = socket.socket(); srv.bind(("127.0.0.1", port)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
if mode == "tls":
    conn = ctx.wrap_socket(conn, server_side=True)
buf = bytearray(piece)
c0 = resource.getrusage(resource.RUSAGE_SELF)
with open(path, "rb") as f:
    for i in range(size // piece):
        conn.sendall(HEADER.pack(0, b"\0\0\0", i, piece))
        if mode == "tcp":
            conn.sendfile(f, i * piece, piece)
        else:
            os.preadv(f.fileno(), [buf], i * piece)
            conn.sendall(buf)
    conn.sendall(HEADER.pack(2, b"\0\0\0", size // piece, 0))
    conn.recv(1)
c1 = resource.getrusage(resource.RUSAGE_SELF)
print((c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime), flush=True)
"""


class Timers:
    """CPU seconds per stage, summed over threads."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, name: str, dt: float) -> None:
        with self.lock:
            self.t[name] = self.t.get(name, 0.0) + dt


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("sender ended early")
        got += n


class Store:
    """O_DIRECT writer threads and a committer: one fdatasync + one SQLite commit per group."""

    def __init__(self, path: Path, writers: int, timers: Timers, buffers: queue.SimpleQueue) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.db = sqlite3.connect(path.with_suffix(".sqlite"), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS present (idx INTEGER PRIMARY KEY, size INTEGER)")
        self.q: queue.Queue = queue.Queue(32)
        self.timers, self.buffers = timers, buffers
        self.cond = threading.Condition()
        self.written: list[int] = []
        self.closing = False
        self.threads = [threading.Thread(target=self._write_loop) for _ in range(writers)]
        self.committer = threading.Thread(target=self._commit_loop)
        for t in (*self.threads, self.committer):
            t.start()

    def put(self, i: int, buf: mmap.mmap) -> None:
        self.q.put((i, buf))

    def _write_loop(self) -> None:
        cpu = 0.0
        while (item := self.q.get()) is not None:
            i, buf = item
            c0 = time.thread_time()
            os.pwrite(self.dfd, buf, i * PIECE)
            cpu += time.thread_time() - c0
            self.buffers.put(buf)
            with self.cond:
                self.written.append(i)
                if len(self.written) >= GROUP:
                    self.cond.notify()
        self.timers.add("writer threads: O_DIRECT pwrite", cpu)

    def _commit_loop(self) -> None:
        sync = commit = 0.0
        while True:
            with self.cond:
                self.cond.wait_for(lambda: len(self.written) >= GROUP or self.closing, timeout=0.05)
                batch, self.written = self.written, []
                done = self.closing
            if batch:
                c0 = time.thread_time()
                os.fdatasync(self.fd)
                c1 = time.thread_time()
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT OR REPLACE INTO present VALUES (?,?)", [(i, PIECE) for i in batch])
                self.db.execute("COMMIT")
                sync += c1 - c0
                commit += time.thread_time() - c1
            if done:
                break
        self.timers.add("committer: fdatasync", sync)
        self.timers.add("committer: SQLite commit", commit)

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.committer.join()
        os.close(self.dfd)
        os.close(self.fd)
        self.db.close()


def receive(sock: socket.socket, n: int, store: Store | None, timers: Timers, buffers: queue.SimpleQueue) -> None:
    """The receiver thread: header, piece into an aligned buffer, BLAKE3, hand-off."""
    head = bytearray(HEADER.size)
    recv = hashing = handoff = 0.0
    for _ in range(n):
        c0 = time.thread_time()
        _recv_exact(sock, memoryview(head))
        try:
            buf = buffers.get_nowait()
        except queue.Empty:
            buf = mmap.mmap(-1, PIECE)
        kind, _, i, length = HEADER.unpack(head)
        _recv_exact(sock, memoryview(buf))
        c1 = time.thread_time()
        blake3.blake3(buf).digest()
        c2 = time.thread_time()
        if store is not None:
            store.put(i, buf)
        else:
            buffers.put(buf)
        c3 = time.thread_time()
        recv, hashing, handoff = recv + c1 - c0, hashing + c2 - c1, handoff + c3 - c2
    _recv_exact(sock, memoryview(head))
    timers.add("receiver: recv_into (headers + pieces)", recv)
    timers.add("receiver: BLAKE3", hashing)
    timers.add("receiver: queue hand-off", handoff)


def run_once(src: Path, tmp: Path, mode: str, writers: int, durable: bool, suites: str = "product") -> dict:
    """One transfer of `src`; `suites`: the sender's TLS 1.3 cipher suites ("product": kvnet's)."""
    n = src.stat().st_size // PIECE
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(src), mode, "0", str(ROOT), suites],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    timers, buffers = Timers(), queue.SimpleQueue()
    p0 = time.process_time()
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if mode == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    store = Store(tmp / f"floor-{time.monotonic_ns()}.kv", writers, timers, buffers) if durable else None
    receive(sock, n, store, timers, buffers)
    if store is not None:
        store.close()
    seconds = time.perf_counter() - t0
    sock.sendall(b"x")
    sender_cpu = float(proc.stdout.readline())
    proc.wait()
    sock.close()
    gib = n * PIECE / GIB
    return {"mb_s": n * PIECE / 1e6 / seconds, "seconds": seconds,
            "cpu_s_per_gib": {"receiver process": (time.process_time() - p0) / gib, "sender process": sender_cpu / gib,
                              **{k: v / gib for k, v in timers.t.items()}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", choices=["tcp", "tls", "both"], default="both")
    ap.add_argument("--writers", type=int, default=WRITERS, help="O_DIRECT writer threads")
    ap.add_argument("--no-store", action="store_true", help="receive + BLAKE3 only")
    ap.add_argument("--suites", default="product",
                    help="the sender's TLS 1.3 suites, e.g. TLS_AES_256_GCM_SHA384 (default: kvnet's order)")
    ap.add_argument("--dir", type=Path, default=None, help="where the data files go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bulk_floor.json")
    args = ap.parse_args()
    modes = ["tcp", "tls"] if args.mode == "both" else [args.mode]
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvnet-floor-", dir=args.dir) as d:
        tmp = Path(d)
        src = tmp / "source.kv"
        src.write_bytes(os.urandom(args.mb * PIECE))
        for mode in modes:
            runs = [run_once(src, tmp, mode, args.writers, not args.no_store, args.suites) for _ in range(args.runs)]
            for f in tmp.glob("floor-*"):
                f.unlink()
            med = {k: statistics.median(r["cpu_s_per_gib"].get(k, 0.0) for r in runs) for k in runs[0]["cpu_s_per_gib"]}
            mbs = [r["mb_s"] for r in runs]
            report[mode] = {"mb_s": mbs, "cpu_s_per_gib": med}
            print(f"floor {mode}, {args.mb} MiB, {args.writers} writers, {'no store' if args.no_store else 'durable'}: "
                  f"MB/s min/median/max {min(mbs):.0f}/{statistics.median(mbs):.0f}/{max(mbs):.0f}")
            for k, v in med.items():
                print(f"  {k:45s} {v:6.3f} CPU s/GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
