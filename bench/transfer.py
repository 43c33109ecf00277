"""Transfer throughput over loopback: raw TCP vs kvnet fetch from 1 and from 3 provider processes.

    .venv/bin/python bench/transfer.py --mb 256 --runs 3

Providers are real `kvnet serve` processes holding a signed 256 MiB artifact (Qwen3-0.6B-shaped
bf16 KV of seeded bytes); the fetcher runs in this process and every figure includes verifying each
piece against the signed manifest and the fsync'd store write. Medians of --runs.
"""

from __future__ import annotations

import argparse
import json
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


async def fetch_once(tmp: Path, bootstrap: str, mid: bytes, n_providers: int, window: int, batch: int) -> dict:
    client = Node(Ed25519PrivateKey.generate(), Store(tmp / "store"), bootstrap=[bootstrap], timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(client.run, announce=False))  # like `kvnet fetch`
        found = None
        for _ in range(50):  # announcements may still be propagating
            found = await client.find_manifest(mid)
            if found and len(found.providers) >= n_providers:
                break
            await trio.sleep(0.2)
        found.providers = found.providers[:n_providers]
        result = await client.fetch(found, found.signed.manifest.n_tokens, window=window, batch=batch)
        nursery.cancel_scope.cancel()
    client.store.close()
    return {"mb_s": result.mb_per_s, "seconds": result.seconds,
            "per_provider": {p[:12]: s["pieces"] for p, s in result.providers.items()}}


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
        try:
            rows = {"raw TCP loopback (1 MiB writes)": [raw_tcp(args.mb) for _ in range(args.runs)]}
            for n in (1, 3):
                runs = []
                for r in range(args.runs):
                    res = trio.run(fetch_once, tmp / f"C{n}-{r}", addrs[0], sm.id, n, args.window, args.batch)
                    console.print(f"  {n} provider(s), run {r + 1}: {res['mb_s']:.0f} MB/s {res['per_provider']}")
                    runs.append(res["mb_s"])
                rows[f"kvnet fetch, {n} provider{'s' if n > 1 else ''} (verify + store)"] = runs
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    table = Table("path", "median MB/s", "runs", title=f"{args.mb} MiB over loopback, window {args.window}, "
                  f"batch {args.batch}")
    for name, runs in rows.items():
        table.add_row(name, f"{statistics.median(runs):.0f}", ", ".join(f"{x:.0f}" for x in runs))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({k: {"median": statistics.median(v), "runs": v} for k, v in rows.items()},
                                   indent=2))


if __name__ == "__main__":
    main()
