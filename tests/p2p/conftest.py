"""Helpers for network tests: real libp2p nodes on loopback, each with its own store and scores."""

from __future__ import annotations

from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet.p2p import wire
from kvnet.p2p.node import Node
from kvnet.p2p.server import PIECES_PROTOCOL
from kvnet.store import Store


def make_node(tmp: Path, name: str, bootstrap: list[str] | None = None, **kw) -> Node:
    store = Store(tmp / name / "store")
    return Node(Ed25519PrivateKey.generate(), store, bootstrap=bootstrap or [],
                scores_path=tmp / name / "scores.sqlite", **kw)


def holding(tmp: Path, name: str, sm, pieces, **kw) -> Node:
    """A node that already holds every piece of `sm`."""
    node = make_node(tmp, name, **kw)
    node.store.put_manifest(sm.raw)
    node.store.put_pieces(sm.id, list(enumerate(pieces)))
    return node


async def start_nodes(nursery: trio.Nursery, first: Node, *others: Node) -> None:
    """Start `first`, then the others with `first` as their bootstrap peer."""
    await nursery.start(first.run)
    for node in others:
        node.bootstrap = [first.addrs[0]]
        await nursery.start(node.run)


def pid(node: Node) -> str:
    return node.peer_id.to_base58()


def rss_mb() -> float:
    """This process's resident memory in MB (attack tests bound what strangers make a node hold)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def ask_frames(client, host, protocol: str, msg: dict) -> tuple[list[dict], int]:
    """One request's answer frames and the piece bytes read, up to `done`, an error, or one frame."""
    stream = await client.host.new_stream(host.peer_id, [protocol])
    frames, got = [], 0
    try:
        with trio.fail_after(5):
            await wire.write_frame(stream, msg)
            while True:
                head = await wire.read_frame(stream, wire.MAX_RESPONSE)
                frames.append(head)
                if "n" in head:
                    got += len(await wire.read_exact(stream, head["n"]))
                if protocol != PIECES_PROTOCOL or "done" in head or "err" in head:
                    return frames, got
    finally:
        await stream.close()


async def found_by(node: Node, manifest_id: bytes, peers: set[str]):
    """`node.find_manifest` once it found exactly `peers` (base58 peer ids). A lookup stops
    OFFER_GRACE_S after the first offer that verifies, so on a loaded machine another provider's offer
    may come too late for one lookup: tests that need every provider found look again (at most 30 s)."""
    with trio.fail_after(30):
        while True:
            found = await node.find_manifest(manifest_id)
            if found is not None and {p.peer for p in found.providers} == peers:
                return found
            await trio.sleep(0.1)
