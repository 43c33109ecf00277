"""A fetch whose providers lied or vanished looks the manifest up again (Node.fetch, MAX_RELOOKUPS).

The `phantom` lie (devnet/liar.py): a provider offers the real manifest with every piece and holds none,
answering `missing` to every piece request. When its offer is the first to verify, the lookup ends
with it alone; the fetch then fails, and must look again without it, keep what verified, pay for it,
and only give up once a bounded number of re-lookups found nobody else.

Determinism: the honest holder runs with `announce=False`, so no lookup can find it until it
announces, and it announces from inside the phantom's first piece request (`PhantomServer.before`):
the first lookup can only return the phantom, and the re-lookup, which starts after the phantom's
`missing` answers, finds the honest holder's records by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from kvnet import identity
from kvnet.ledger import SpendingLimits
from kvnet.p2p import dht as kdht
from kvnet.p2p import wire
from kvnet.p2p.fetcher import FetchError
from kvnet.p2p.node import MAX_RELOOKUPS, Found, Node
from kvnet.p2p.server import HostingTerms, PieceServer
from kvnet.receipts import hosting_cost
from tests.artifacts import fake_artifact
from tests.p2p.conftest import holding, make_node, pid

PIECE = 1 << 16  # 64 KiB pieces
FEE = 40  # micro-units per MiB


class PhantomServer(PieceServer):
    """Offers `sm` with every piece claimed; its store holds the manifest and no piece, so every piece
    request is answered `missing`. `before` runs once, before the first piece request is answered."""

    def __init__(self, runner, sm, before: Callable[[], Awaitable[Any]] | None = None) -> None:
        super().__init__(runner)
        self.sm, self.before = sm, before
        self.offers_answered = 0
        self.piece_requests = 0

    def _offers_for(self, key: bytes) -> list[dict]:
        self.offers_answered += 1
        n = len(self.sm.manifest.pieces)
        return [{"manifest": self.sm.raw, "have": wire.bitfield(set(range(n)), n)}]

    async def _pieces(self, stream: Any) -> None:
        self.piece_requests += 1
        before, self.before = self.before, None
        if before is not None:
            await before()
        await super()._pieces(stream)


def phantom(tmp_path, sm, before=None) -> Node:
    """A liar node (no bulk listener: it lies on `pieces` streams) that announces nothing itself."""
    node = make_node(tmp_path, "phantom", timeout=3.0, bulk_listen=None)
    node.store.put_manifest(sm.raw)
    node.server = PhantomServer(node.runner, sm, before)
    return node


async def provide_all(node: Node, sm) -> None:
    """The provider records a holder of every piece sends (as devnet/liar.py does for its lie)."""
    for k in kdht.announce_keys(sm.manifest, sm.id, set(range(len(sm.manifest.pieces)))):
        await kdht.provide(node.dht, k, node.timeout)


async def start(nursery: trio.Nursery, boot: Node, *others: tuple[Node, bool]) -> None:
    """Start `boot` (announcing nothing), then each (node, announce) with `boot` as bootstrap peer."""
    await nursery.start(lambda task_status: boot.run(announce=False, task_status=task_status))
    for node, announce in others:
        node.bootstrap = [boot.addrs[0]]
        await nursery.start(lambda task_status, node=node, a=announce: node.run(announce=a, task_status=task_status))


def _relookup_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kvnet.p2p.node" and r.levelno == logging.INFO and "looking it up again" in r.getMessage()]


@pytest.mark.trio
async def test_a_fetch_whose_only_provider_is_a_phantom_looks_again_and_gets_the_honest_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kvnet.p2p.node")
    sm, pieces = fake_artifact(91, 1, piece_size=PIECE)
    honest = holding(tmp_path, "honest", sm, pieces, timeout=3.0)
    liar = phantom(tmp_path, sm, before=lambda: honest.announce(sm.id))
    boot, c = make_node(tmp_path, "boot", timeout=3.0), make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start(n, boot, (liar, False), (honest, False), (c, False))
        await provide_all(liar, sm)
        found = await c.find_manifest(sm.id)
        assert [p.peer for p in found.providers] == [pid(liar)]  # nobody else has announced
        result = await c.fetch(found)
        n.cancel_scope.cancel()
    assert c.store.missing_pieces(sm.id) == [] and c.store.check() == []
    assert result.fetched == len(pieces) and result.already_had == 0
    assert result.providers[pid(honest)]["pieces"] == len(pieces)
    assert result.providers[pid(liar)]["pieces"] == 0
    assert liar.server.served_pieces == 0 and liar.server.piece_requests >= 1
    # asked for its offer by the first lookup only: the re-lookup skipped it
    assert liar.server.offers_answered == 1
    assert c.scores.get(pid(liar)) < 0  # `phantom`: it claimed pieces and served none
    lines = _relookup_lines(caplog)  # a second one only if a stream to the honest one failed to open
    assert 1 <= len(lines) <= MAX_RELOOKUPS
    assert f"(1 of {MAX_RELOOKUPS})" in lines[0] and "could not be fetched" in lines[0]


@pytest.mark.trio
async def test_a_relookup_keeps_what_verified_and_every_attempt_is_paid(tmp_path):
    """Attempt 1: the free phantom (chosen for its price) serves nothing. Attempt 2: the reserve, a
    paid host holding the first half, serves that half and is paid. Re-lookup: the phantom skipped,
    the first host no help (it has nothing missing), the full holder found; attempt 3 asks it for
    the second half only. The result and `last_paid` count every attempt; both ledgers agree."""
    sm, pieces = fake_artifact(92, 2, piece_size=PIECE)
    half = len(pieces) // 2
    part = make_node(tmp_path, "part", timeout=3.0, terms=HostingTerms(fee_per_mib=FEE))
    part.store.put_manifest(sm.raw)
    part.store.put_pieces(sm.id, list(enumerate(pieces[:half])))
    full = holding(tmp_path, "full", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE))
    liar = phantom(tmp_path, sm, before=lambda: full.announce(sm.id))
    boot, c = make_node(tmp_path, "boot", timeout=3.0), make_node(tmp_path, "C", timeout=3.0)
    progress: list[tuple[int, int]] = []
    async with trio.open_nursery() as n:
        await start(n, boot, (liar, False), (part, False), (full, False), (c, False))
        await provide_all(liar, sm)
        for host in (part, liar):  # a fetch-only node refreshes its routing table in the background
            await c.connect(host.addrs[0], refresh=False)
        offers = [*await c.offers(part.peer_id, sm.id), *await c.offers(liar.peer_id, sm.id)]
        assert [len(o.have) for o in offers] == [half, len(pieces)]
        found = Found(sm, sm.manifest.n_tokens, [o.provider() for o in offers], 1, offers)
        assert [p.peer for p in c.payer.start(sm, found.providers, sm.manifest.total_bytes,
                                              c.scores).providers] == [pid(liar)]  # `part` a reserve
        result = await c.fetch(found, on_piece=lambda done, total: progress.append((done, total)))
        n.cancel_scope.cancel()
    assert c.store.missing_pieces(sm.id) == [] and c.store.check() == []
    assert result.fetched == len(pieces) and result.bytes == sm.manifest.total_bytes
    assert result.providers[pid(part)]["pieces"] == half
    assert result.providers[pid(full)]["pieces"] == len(pieces) - half  # only what was still missing
    assert result.providers[pid(liar)]["pieces"] == 0
    assert progress[-1] == (len(pieces), len(pieces))  # progress counts on across attempts
    key = identity.public_bytes(c.key)
    for host, n_pieces in ((part, half), (full, len(pieces) - half)):
        paid = c.ledger.paid_by(key, "USD", payee=identity.public_bytes(host.key))
        assert paid == host.ledger.paid_by(key, "USD") >= hosting_cost(n_pieces * PIECE, FEE)
        assert c.last_paid[pid(host)] == paid  # the failed attempt's payment is in the fetch's total
    assert c.last_paid.get(pid(liar), 0) == 0


@pytest.mark.trio
async def test_a_fetch_nobody_else_can_serve_gives_up_after_a_bounded_relookup(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kvnet.p2p.node")
    sm, _ = fake_artifact(93, 1, piece_size=PIECE)
    liar = phantom(tmp_path, sm)
    boot, c = make_node(tmp_path, "boot", timeout=3.0), make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start(n, boot, (liar, False), (c, False))
        await provide_all(liar, sm)
        found = await c.find_manifest(sm.id)
        with pytest.raises(FetchError, match="could not be fetched"):
            await c.fetch(found)
        n.cancel_scope.cancel()
    assert c.store.present_pieces(sm.id) == set()
    assert liar.server.offers_answered == 1  # the re-lookup did not ask it again
    assert len(_relookup_lines(caplog)) == 1  # it found nobody else: no second, identical one
    assert c.last_paid == {pid(liar): 0}


@pytest.mark.trio
async def test_spending_limits_hold_across_a_relookup(tmp_path):
    """The day's limit counts what the failed attempt paid: the first host (fee 40) serves the half it
    holds and is paid; the re-lookup finds a full holder at fee 100 whose half alone (100) is within
    the limit (100) but not on top of what was paid (>= 40): it is refused, before any byte moves."""
    sm, pieces = fake_artifact(94, 2, piece_size=PIECE)
    half = len(pieces) // 2
    part = make_node(tmp_path, "part", timeout=3.0, terms=HostingTerms(fee_per_mib=FEE))
    part.store.put_manifest(sm.raw)
    part.store.put_pieces(sm.id, list(enumerate(pieces[:half])))
    dear = holding(tmp_path, "dear", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=100))
    limit = hosting_cost(sm.manifest.total_bytes - half * PIECE, 100)
    assert hosting_cost(sm.manifest.total_bytes, FEE) <= limit  # the first host's whole quote fits
    c = make_node(tmp_path, "C", timeout=3.0, spending=SpendingLimits(total_per_day=limit))
    boot = make_node(tmp_path, "boot", timeout=3.0)
    async with trio.open_nursery() as n:
        await start(n, boot, (part, False), (dear, True), (c, False))
        await c.connect(part.addrs[0], refresh=False)  # a fetch-only node refreshes its table in the background
        offers = await c.offers(part.peer_id, sm.id)
        assert [len(o.have) for o in offers] == [half]
        with pytest.raises(FetchError, match="beyond the spending limits"):
            await c.fetch(Found(sm, sm.manifest.n_tokens, [o.provider() for o in offers], 1, offers))
        n.cancel_scope.cancel()
    key = identity.public_bytes(c.key)
    assert c.store.present_pieces(sm.id) == set(range(half))  # what verified stays stored
    paid = c.ledger.paid_by(key, "USD", payee=identity.public_bytes(part.key))
    assert paid >= hosting_cost(half * PIECE, FEE) and c.last_paid == {pid(part): paid}
    assert c.ledger.paid_by(key, "USD", payee=identity.public_bytes(dear.key)) == 0
    assert dear.server.served_bytes == 0 and dear.bulk.served_bytes == 0  # not one piece from it
