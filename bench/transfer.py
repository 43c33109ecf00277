"""Transfer throughput over loopback: raw TCP vs kvnet fetch over libp2p streams and over the bulk
path (TLS and plain TCP), each from 1 and from 3 provider processes.

    .venv/bin/python bench/transfer.py --mb 256 --runs 3

Providers are real `kvnet serve` processes holding a signed 256 MiB artifact (Qwen3-0.6B-shaped
bf16 KV of seeded bytes); the fetcher runs in this process and every fetch figure includes verifying
each piece against the signed manifest and the durable store write. The "receive + verify" rows time
the bulk receiver alone (grants redeemed, every piece verified, then dropped: no store), to show what
the store costs; that is a benchmark-only path. min/median/max of --runs, and each median's ratio
to raw TCP's; "received" is the bytes read from providers over the artifact's size (endgame duplicates).
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvnet.p2p import bulk_wire, wire  # noqa: E402
from kvnet.p2p.bulk_client import BulkConnection, ClientGrant, Handler  # noqa: E402
from kvnet.p2p.node import Node  # noqa: E402
from kvnet.store import Store  # noqa: E402
from tests.artifacts import fake_artifact, provider_home, serve_process  # noqa: E402

console = Console()
SENDER = r"""
import socket, sys
data = bytes(1 << 20)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for _ in range(int(sys.argv[2])):
    s.sendall(data)
s.close()
"""


def raw_tcp(mb: int) -> float:
    """MB/s of a plain TCP stream between two processes on loopback (1 MiB writes)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(srv.getsockname()[1]), str(mb)])
    conn, _ = srv.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    while n := conn.recv_into(view):
        total += n
    dt = time.perf_counter() - t0
    proc.wait()
    conn.close()
    srv.close()
    return total / 1e6 / dt


async def _found(client: Node, mid: bytes, n_providers: int):
    found = None
    for _ in range(50):  # announcements may still be propagating
        found = await client.find_manifest(mid)
        if found and len(found.providers) >= n_providers:
            break
        await trio.sleep(0.2)
    if found is None or len(found.providers) < n_providers:
        raise SystemExit(f"only {len(found.providers) if found else 0} of {n_providers} providers found")
    found.providers = found.providers[:n_providers]
    return found


async def fetch_once(tmp: Path, bootstrap: str, mid: bytes, n_providers: int, window: int, batch: int,
                     bulk: str | None) -> dict:
    client = Node(Ed25519PrivateKey.generate(), Store(tmp / "store"), bootstrap=[bootstrap], timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(client.run, announce=False))  # like `kvnet fetch`
        found = await _found(client, mid, n_providers)
        result = await client.fetch(found, found.signed.manifest.n_tokens, window=window, batch=batch, bulk=bulk)
        nursery.cancel_scope.cancel()
    client.store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"mb_s": result.mb_per_s, "seconds": result.seconds, "received": result.received_bytes / result.bytes,
            "paths": sorted(set(result.paths.values())),
            "per_provider": {p[:12]: (s["pieces"], s["dropped"]) if s["dropped"] else s["pieces"]
                             for p, s in result.providers.items()}}


class _Discard(Handler):
    """Benchmark only: verified pieces are counted and their buffers reused, nothing is stored."""

    def __init__(self, buffers: queue.SimpleQueue) -> None:
        self.buffers, self.bytes = buffers, 0

    def piece(self, grant, index, data) -> None:
        self.bytes += len(data)
        self.buffers.put(data.obj)

    def missing(self, grant, index) -> None:
        raise RuntimeError(f"provider lacks piece {index}")

    def done(self, grant) -> None:
        pass


async def receive_only(bootstrap: str, mid: bytes, mode: str) -> dict:
    """Bulk receive + verify of the whole artifact from one provider, without the store."""
    client = Node(Ed25519PrivateKey.generate(), Store(Path(tempfile.mkdtemp(prefix="kvnet-rx-")) / "store"),
                  bootstrap=[bootstrap], timeout=30, bulk_listen=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(client.run, announce=False))
        found = await _found(client, mid, 1)
        m, peer = found.signed.manifest, found.providers[0].peer
        grants: queue.Queue = queue.Queue()
        answer = None
        t0 = time.perf_counter()
        for start in range(0, len(m.pieces), 64):  # all grants up front: 64 pieces each
            end = min(start + 64, len(m.pieces))
            stream = await client._open(peer, bulk_wire.BULK_PROTOCOL)
            await wire.write_frame(stream, {"v": 1, "manifest": found.signed.id, "ranges": [[start, end]],
                                            "mode": mode, "receipt": None})
            answer = await wire.read_frame(stream, wire.MAX_REQUEST)
            await stream.close()
            grants.put(ClientGrant(answer["token"], list(range(start, end))))
        grants.put(None)
        buffers: queue.SimpleQueue = queue.SimpleQueue()
        sink = _Discard(buffers)

        def run() -> None:
            conn = BulkConnection("127.0.0.1", answer["port"], mode, answer["fingerprint"], 30)
            conn.run(m, grants, sink, buffers)

        await trio.to_thread.run_sync(run)
        seconds = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    client.store.close()
    return {"mb_s": sink.bytes / 1e6 / seconds, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--window", type=int, default=4, help="concurrent requests per provider")
    ap.add_argument("--batch", type=int, default=8, help="pieces per request")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "transfer.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvnet-transfer-") as tmpdir:
        tmp = Path(tmpdir)
        sm, pieces = fake_artifact(7, args.mb, kv_shape=(28, 8, 128))
        console.print(f"artifact: {sm.manifest.total_bytes / 2**20:.0f} MiB in {len(pieces)} pieces")
        procs, addrs = [], []
        for name in ("P1", "P2", "P3"):
            proc, addr = serve_process(provider_home(tmp, name, sm, pieces), addrs[0] if addrs else None)
            procs.append(proc)
            addrs.append(addr)
        del pieces
        rows: dict[str, list[float]] = {}
        received: dict[str, list[float]] = {}
        try:
            rows["raw TCP loopback (1 MiB writes)"] = [raw_tcp(args.mb) for _ in range(args.runs)]
            for mode in ("tls", "tcp"):
                rows[f"bulk {mode}, 1 provider: receive + verify (no store)"] = [
                    trio.run(receive_only, addrs[0], sm.id, mode)["mb_s"] for _ in range(args.runs)]
            for label, bulk in (("libp2p streams", None), ("bulk tls", "tls"), ("bulk tcp", "tcp")):
                for n in (1, 3):
                    runs, rx = [], []
                    for r in range(args.runs):
                        res = trio.run(fetch_once, tmp / f"C-{bulk}-{n}-{r}", addrs[0], sm.id, n, args.window,
                                       args.batch, bulk)
                        console.print(f"  {label}, {n} provider(s), run {r + 1}: {res['mb_s']:.0f} MB/s, "
                                      f"received {res['received']:.3f}x, {res['paths']} {res['per_provider']}")
                        runs.append(res["mb_s"])
                        rx.append(res["received"])
                    name = f"{label}, {n} provider{'s' if n > 1 else ''} (verify + store)"
                    rows[name], received[name] = runs, rx
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    raw = statistics.median(rows["raw TCP loopback (1 MiB writes)"])
    table = Table("path", "min MB/s", "median MB/s", "max MB/s", "median / raw TCP", "received (max)",
                  title=f"{args.mb} MiB over loopback, {args.runs} runs; streams: window {args.window}, "
                  f"batch {args.batch}")
    for name, runs in rows.items():
        rx = f"{max(received[name]):.3f}x" if name in received else ""
        table.add_row(name, f"{min(runs):.0f}", f"{statistics.median(runs):.0f}", f"{max(runs):.0f}",
                      f"{statistics.median(runs) / raw:.2f}", rx)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({k: {"min": min(v), "median": statistics.median(v), "max": max(v),
                                        "ratio_to_raw_tcp": statistics.median(v) / raw, "runs": v,
                                        "received_over_artifact": received.get(k)} for k, v in rows.items()},
                                   indent=2))


if __name__ == "__main__":
    main()
