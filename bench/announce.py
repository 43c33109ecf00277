"""Announcing cost: provider records per artifact, and how long a `kvnet fetch` process lives after its
last piece.

    .venv/bin/python bench/announce.py --blocks 640            # this tree
    .venv/bin/python bench/announce.py --blocks 640 --root DIR  # another checkout (e.g. `git archive`)

(a) One node holding a signed `--blocks`-block artifact (fake KV bytes, 256 B/token, 1 MiB pieces)
starts next to a bootstrap node; we count the DHT provide() calls it makes (wrapping the provider
store's `provide`, so the count is the same for any version of the node).
(b) The same fetch in one process (B, P and the fetching node F in one trio loop, F run as `kvnet
fetch` runs it, through `commands.fetch`): its total time against its transfer time, and F's
provide() calls. Here the announcing F does competes with B's and P's DHT handlers for one loop.
(c) Real processes: a bootstrap `kvnet serve` B, a provider `kvnet serve` P holding the artifact, and
`kvnet fetch --manifest ID --bootstrap B --log-pieces`. We time the fetch process from spawn to exit,
the moment its last piece line appeared, and the transfer time it reports.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--blocks", type=int, default=640, help="artifact size in 256-token blocks (a multiple of 16)")
ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="kvnet checkout to run")
ap.add_argument("--runs", type=int, default=2)
ARGS = ap.parse_args()
ROOT = ARGS.root.resolve()
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from kvnet import identity  # noqa: E402
from kvnet.p2p.node import Node  # noqa: E402
from kvnet.store import Store  # noqa: E402
from tests.artifacts import fake_artifact, provider_home, serve_process  # noqa: E402


def _count_provides(node: Node) -> list[int]:
    """Count the node's DHT provide() calls (whoever makes them) in the returned one-item list."""
    calls = [0]
    real = node.dht.provider_store.provide

    async def counted(key: bytes) -> bool:
        calls[0] += 1
        return await real(key)

    node.dht.provider_store.provide = counted
    return calls


async def count_provides(tmp: Path, sm, pieces) -> tuple[int, float]:
    boot = Node(Ed25519PrivateKey.generate(), Store(tmp / "cb"))
    holder = Node(Ed25519PrivateKey.generate(), Store(tmp / "ch"))
    holder.store.put_manifest(sm.raw)
    holder.store.put_pieces(sm.id, list(enumerate(pieces)))
    calls = _count_provides(holder)
    async with trio.open_nursery() as n:
        b = await n.start(boot.run)
        holder.bootstrap = [b.addrs[0]]
        t0 = time.perf_counter()
        await n.start(holder.run)  # the announcement at start completes before run() reports started
        seconds = time.perf_counter() - t0
        n.cancel_scope.cancel()
    return calls[0], seconds


async def fetch_in_process(tmp: Path, sm, pieces) -> dict[str, float]:
    from kvnet.p2p import commands

    boot = Node(Ed25519PrivateKey.generate(), Store(tmp / "ib"))
    holder = Node(Ed25519PrivateKey.generate(), Store(tmp / "ih"))
    holder.store.put_manifest(sm.raw)
    holder.store.put_pieces(sm.id, list(enumerate(pieces)))
    async with trio.open_nursery() as n:
        b = await n.start(boot.run)
        holder.bootstrap = [b.addrs[0]]
        await n.start(holder.run)
        fetcher = Node(Ed25519PrivateKey.generate(), Store(tmp / "if"), bootstrap=[b.addrs[0]])
        calls = _count_provides(fetcher)
        t0 = time.perf_counter()
        outcome = await commands.fetch(fetcher, manifest_id=sm.id)
        total = time.perf_counter() - t0
        n.cancel_scope.cancel()
    return {"total_s": total, "transfer_s": outcome.result.seconds, "provide_calls": calls[0]}


def fetch_process(tmp: Path, boot_addr: str, mid: bytes, run: int) -> dict[str, float]:
    home = tmp / f"F{run}"
    identity.generate(home / "identity.key")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    args = [sys.executable, "-m", "kvnet.cli", "fetch", "--home", str(home), "--bootstrap", boot_addr,
            "--manifest", mid.hex(), "--log-pieces"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last_piece = first_piece = None
    transfer = None
    for line in proc.stdout:
        if line.startswith("piece"):
            first_piece = first_piece or time.perf_counter()
            last_piece = time.perf_counter()
        m = re.search(r"fetched \d+ pieces .* in ([0-9.]+) s", line)
        if m:
            transfer = float(m.group(1))
    proc.wait()
    exited = time.perf_counter()
    if proc.returncode != 0 or last_piece is None:
        raise RuntimeError(f"fetch failed: {proc.stderr.read()[-2000:]}")
    return {"wall_s": exited - t0, "first_piece_at_s": first_piece - t0, "last_piece_at_s": last_piece - t0,
            "exit_after_last_piece_s": exited - last_piece, "transfer_s": transfer or 0.0,
            "stderr_lines": len(proc.stderr.read().splitlines())}


def main() -> None:
    mb = ARGS.blocks // 16  # 16 blocks of 256 tokens at 256 B/token = 1 MiB
    sm, pieces = fake_artifact(9, mb, kv_shape=(2, 2, 16))
    print(f"root {ROOT}\nartifact: {len(sm.manifest.chain)} blocks, {len(pieces)} pieces of 1 MiB")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calls, seconds = trio.run(count_provides, tmp, sm, pieces)
        print(f"provider records announced by a node holding it: {calls} (start-up incl. announcing: {seconds:.2f} s)")
        r = trio.run(fetch_in_process, tmp, sm, pieces)
        print("in-process fetch: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in r.items()))
        b_home = tmp / "B"
        identity.generate(b_home / "identity.key")
        b, b_addr = serve_process(b_home)
        p, _ = serve_process(provider_home(tmp, "P", sm, pieces), b_addr)
        try:
            time.sleep(2)
            for run in range(ARGS.runs):
                r = fetch_process(tmp, b_addr, sm.id, run)
                print("kvnet fetch: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in r.items()))
        finally:
            for proc in (b, p):
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
