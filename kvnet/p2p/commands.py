"""The network commands behind `kvnet serve` and `kvnet fetch`, as plain trio functions.

Failure contract (the CLI turns each into one line): a malformed bootstrap address raises
`BootstrapError` from `open_node` before anything starts; unreachable bootstrap peers never raise,
`fetch` reports them in `FetchOutcome.error`; `run_trio` turns an ExceptionGroup that carries a
`KvnetError` into that error, so no nested group traceback reaches the user.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from kvnet import identity
from kvnet.errors import first_kvnet_error
from kvnet.ledger import Ledger, SpendingLimitError, SpendingLimits
from kvnet.manifest import ManifestError
from kvnet.p2p.bulk_wire import DEFAULT_MODE
from kvnet.p2p.fetcher import FetchError, FetchResult
from kvnet.p2p.node import Found, Node, validate_bootstrap
from kvnet.p2p.server import HostingTerms
from kvnet.p2p.stats import STATS_INTERVAL_S, stats_loop
from kvnet.refusals import FILENAME as refusals_file
from kvnet.refusals import Refusals
from kvnet.store import Store, StoreError

T = TypeVar("T")
NO_BOOTSTRAP = "no peer was asked (no --bootstrap given)"


def open_node(home: Path, listen: list[str] | None, bootstrap: list[str], timeout: float = 10.0,
              capacity_bytes: int | None = None, terms: HostingTerms | None = None,
              credit_window: int | None = None, spending: SpendingLimits | None = None) -> Node:
    """A node for `home`. Bootstrap addresses are checked first: a malformed one is a `BootstrapError`.
    Payments: `terms` (what it charges for hosting), `credit_window`, `spending` limits; the ledger is
    `<home>/ledger.sqlite` (docs/payments.md)."""
    validate_bootstrap(bootstrap)
    key = identity.load(home / "identity.key")
    store = Store(home / "store", capacity_bytes=capacity_bytes)
    return Node(key, store, listen=listen, bootstrap=bootstrap, scores_path=home / "peer-scores.sqlite",
                timeout=timeout, terms=terms, ledger=Ledger(home / "ledger.sqlite", key),
                credit_window=credit_window, spending=spending,
                refusals=Refusals(home / refusals_file), proofs_dir=home / "proofs")


async def serve(node: Node, on_ready: Callable[[Node], None], stats_file: Path | None = None,
                stats_interval: float = STATS_INTERVAL_S) -> None:
    """Run until SIGINT/SIGTERM, serving the store and keeping its announcements fresh.

    With `stats_file`, the node's resource use (kvnet.p2p.stats) is rewritten there every
    `stats_interval` seconds."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if stats_file is not None:
                nursery.start_soon(stats_loop, node, stats_file, stats_interval)
            on_ready(node)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@dataclass
class FetchOutcome:
    found: Found | None
    result: FetchResult | None
    error: str | None = None  # why the fetch failed (nobody had some pieces, the store is full, ...)
    paid: dict[str, int] = field(default_factory=dict)  # peer -> micro-units signed for hosting


async def fetch(node: Node, *, manifest_id: bytes | None = None, model_id: bytes | None = None,
                tokens: list[int] | None = None, min_tokens: int = 1,
                on_piece: Callable[[int, int], None] | None = None,
                on_found: Callable[[Found], None] | None = None,
                bulk: str | None = DEFAULT_MODE,
                on_verified_for: Callable[[Found], Callable[[int, Any], None] | None] | None = None) -> FetchOutcome:
    """Join the network, find a manifest (by id, or the longest prefix of `tokens`), fetch it, leave.

    `bulk`: the bulk connection mode asked of providers ("tls", "tcp"), or None for libp2p streams only.
    `on_verified_for(found)`: the `on_verified` callback for the fetch of `found` (Node.fetch), or None.

    A prefix covering fewer than `min_tokens` tokens is found but not fetched (we have as much).
    The node announces nothing (this process exits right after; a `kvnet serve` on the same home
    announces what it fetched). With no bootstrap peer, or none reachable, `error` says so.
    """
    if not node.bootstrap:
        return FetchOutcome(None, None, NO_BOOTSTRAP)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(node.run, announce=False))
        if not node.bootstrap_reached:
            nursery.cancel_scope.cancel()
            return FetchOutcome(None, None, unreachable_message(node))
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
                on_verified = on_verified_for(found) if on_verified_for is not None else None
                result = await node.fetch(found, n, on_piece=on_piece, bulk=bulk, on_verified=on_verified)
            except (FetchError, StoreError, ManifestError, SpendingLimitError) as exc:
                error = str(exc)
        nursery.cancel_scope.cancel()
    return FetchOutcome(found, result, error, dict(node.last_paid) if result is not None else {})


def unreachable_message(node: Node) -> str:
    tried = "; ".join(f"{addr}: {why}" for addr, why in node.bootstrap_failed.items())
    return f"no bootstrap peer reachable (tried {len(node.bootstrap)}: {tried})"


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`trio.run(fn, *args)`, raising the first `KvnetError` inside an ExceptionGroup instead of the group.

    Nurseries wrap a failure in (nested) groups; a deliberate error must reach the CLI as itself so
    it prints one line. Groups without a `KvnetError` (bugs) propagate unchanged.
    """
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        err = first_kvnet_error(group)
        if err is None:
            raise
        raise err from None


def line(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)
