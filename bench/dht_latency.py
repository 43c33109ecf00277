"""DHT lookup latency on loopback: N kvnet nodes (one trio process), each bootstrapped only from node 0.

    .venv/bin/python bench/dht_latency.py --nodes 10 --lookups 40

Each node announces a different seeded document (a 16-block document each) the way kvnet nodes do:
the chain keys at 1, 2, 4, 8 and 16 blocks. Then, from random nodes, we time (a) a provider lookup of
one key and (b) the DHT part of a prefix lookup of a prompt that shares 11 of a document's blocks
(it finds the 8-block key; the offers then extend the match to 11, see docs/discovery.md). Fresh
keys on every lookup, so nothing is served from a local cache. Medians and 90th percentiles.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvnet import chain  # noqa: E402
from kvnet.p2p import dht as kdht  # noqa: E402
from kvnet.p2p.node import Node  # noqa: E402
from kvnet.store import Store  # noqa: E402

BLOCK = 256
MODEL = bytes(range(32))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(n_nodes: int, lookups: int, tmp: Path) -> dict[str, list[float]]:
    rng = random.Random(0)
    nodes = [Node(Ed25519PrivateKey.generate(), Store(tmp / f"n{i}"), timeout=10) for i in range(n_nodes)]
    docs: list[tuple[int, list[int]]] = []
    out: dict[str, list[float]] = {"provider lookup (1 key)": [], "prefix lookup (16-block prompt)": [],
                                   "DHT queries per prefix lookup": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(nodes[0].run)
        for node in nodes[1:]:
            node.bootstrap = [nodes[0].addrs[0]]
            await nursery.start(node.run)  # empty stores: the nodes' own announcing sends nothing
        for node in nodes:  # let every routing table learn the others
            await node.dht.refresh_routing_table()
        for _ in range(lookups):
            publisher = rng.randrange(n_nodes)
            doc = [rng.randrange(151936) for _ in range(16 * BLOCK)]
            for k in chain.chain_keys(MODEL, doc, BLOCK):
                if kdht.is_announced_block_count(k.n_tokens // BLOCK):
                    await nodes[publisher].dht.provider_store.provide(k.key)
            docs.append((publisher, doc))
        await trio.sleep(0.5)
        for publisher, doc in docs:
            asker = rng.choice([i for i in range(n_nodes) if i != publisher])
            dht = nodes[asker].dht
            key = chain.chain_keys(MODEL, doc[: 4 * BLOCK], BLOCK)[-1].key
            t0 = time.perf_counter()
            found = await kdht.find_provider_ids(dht, key, nodes[asker].peer_id)
            out["provider lookup (1 key)"].append((time.perf_counter() - t0) * 1000)
            assert nodes[publisher].peer_id in found
            prompt = doc[: 11 * BLOCK] + [1, 2, 3] * 100  # shares 11 of the document's 16 blocks
            t0 = time.perf_counter()
            hit = await kdht.find_longest_prefix(dht, MODEL, prompt, BLOCK, nodes[asker].peer_id)
            out["prefix lookup (16-block prompt)"].append((time.perf_counter() - t0) * 1000)
            out["DHT queries per prefix lookup"].append(hit.queries)
            assert hit.n_tokens == 8 * BLOCK and nodes[publisher].peer_id in hit.providers
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--lookups", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = trio.run(run, args.nodes, args.lookups, Path(tmp))
    t = Table("measure", "median", "p90", "max", title=f"{args.nodes} nodes on loopback, {args.lookups} lookups")
    for name, xs in res.items():
        unit = "" if "queries" in name else " ms"
        t.add_row(name, f"{statistics.median(xs):.1f}{unit}", f"{pct(xs, 0.9):.1f}{unit}", f"{max(xs):.1f}{unit}")
    Console().print(t)


if __name__ == "__main__":
    main()
