"""Helpers for network tests: real libp2p nodes on loopback, each with its own store and scores."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet.p2p.node import Node
from kvnet.store import Store


def make_node(tmp: Path, name: str, bootstrap: list[str] | None = None, **kw) -> Node:
    store = Store(tmp / name / "store")
    return Node(Ed25519PrivateKey.generate(), store, bootstrap=bootstrap or [],
                scores_path=tmp / name / "scores.sqlite", **kw)


def rss_mb() -> float:
    """This process's resident memory in MB (attack tests bound what strangers make a node hold)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
