"""The network commands behind `kvnet serve` and `kvnet fetch`, as plain trio functions."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from kvnet import identity
from kvnet.manifest import ManifestError
from kvnet.p2p.fetcher import FetchError, FetchResult
from kvnet.p2p.node import Found, Node
from kvnet.store import Store, StoreError


def open_node(home: Path, listen: list[str] | None, bootstrap: list[str], timeout: float = 10.0,
              capacity_bytes: int | None = None) -> Node:
    key = identity.load(home / "identity.key")
    store = Store(home / "store", capacity_bytes=capacity_bytes)
    return Node(key, store, listen=listen, bootstrap=bootstrap, scores_path=home / "peer-scores.sqlite",
                timeout=timeout)


async def serve(node: Node, on_ready: Callable[[Node], None]) -> None:
    """Run until SIGINT/SIGTERM, serving the store and keeping its announcements fresh."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            on_ready(node)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@dataclass
class FetchOutcome:
    found: Found | None
    result: FetchResult | None
    error: str | None = None  # why the fetch failed (nobody had some pieces, the store is full, ...)


async def fetch(node: Node, *, manifest_id: bytes | None = None, model_id: bytes | None = None,
                tokens: list[int] | None = None, min_tokens: int = 1,
                on_piece: Callable[[int, int], None] | None = None,
                on_found: Callable[[Found], None] | None = None) -> FetchOutcome:
    """Join the network, find a manifest (by id, or the longest prefix of `tokens`), fetch it, leave.

    A prefix covering fewer than `min_tokens` tokens is found but not fetched (we have as much)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        if manifest_id is not None:
            found = await node.find_manifest(manifest_id)
        else:
            found = await node.find(model_id, tokens or [])
        result, error = None, None
        if found is not None and found.n_tokens < min_tokens:
            found = None
        if found is not None:
            if on_found:
                on_found(found)
            n = found.signed.manifest.n_tokens if manifest_id is not None else found.n_tokens
            try:
                result = await node.fetch(found, n, on_piece=on_piece)
            except (FetchError, StoreError, ManifestError) as exc:
                error = str(exc)
        nursery.cancel_scope.cancel()
    return FetchOutcome(found, result, error)


def line(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)
