"""License receipts between real libp2p nodes (docs/payments.md, "On the wire"): a load pays the
publisher's price once, with the first request, to the host that serves it; the host (a mirror that
charges nothing for hosting) verifies and keeps it; the publisher's own peer collects it over
`/kvnet/receipts/1.0.0` into its ledger, and a third node asking for the publisher's receipts is refused."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import trio

from kvnet import identity
from kvnet.ledger import SpendingLimitError, SpendingLimits
from kvnet.manifest import Terms
from kvnet.p2p import billing, wire
from kvnet.p2p.server import HostingTerms
from kvnet.receipts import verify_batch
from tests.artifacts import fake_artifact
from tests.p2p.conftest import make_node

PIECE = 1 << 16
PRICE = 500


def _key(node) -> bytes:
    return identity.public_bytes(node.key)


def _pid(node) -> str:
    return node.peer_id.to_base58()


def _priced(publisher, seed: int):
    """A manifest of `publisher` with a license price, and its pieces."""
    sm, pieces = fake_artifact(seed, 1, piece_size=PIECE)
    m = dataclasses.replace(sm.manifest, publisher=_key(publisher), terms=Terms(PRICE, "USD"))
    return m.sign(publisher.key), pieces


@pytest.mark.trio
async def test_a_mirror_keeps_license_receipts_the_publisher_collects_and_a_third_node_cannot(tmp_path):
    p = make_node(tmp_path, "P", timeout=3.0)  # the publisher: holds nothing, serves nothing here
    sm, pieces = _priced(p, 81)
    mirror = make_node(tmp_path, "M", timeout=3.0, terms=HostingTerms(fee_per_mib=0))
    mirror.store.put_manifest(sm.raw)
    mirror.store.put_pieces(sm.id, list(enumerate(pieces)))
    clients = [make_node(tmp_path, f"C{i}", timeout=3.0) for i in range(2)]
    third = make_node(tmp_path, "T", timeout=3.0)
    async with trio.open_nursery() as n:
        await n.start(mirror.run)
        for node in (p, *clients, third):
            node.bootstrap = [mirror.addrs[0]]
            await n.start(partial(node.run, announce=node is p))  # the clients fetch only, as `kvnet fetch`
        for c in clients:  # two loads, one license receipt each
            found = await c.find_manifest(sm.id)
            assert [x.peer for x in found.providers] == [_pid(mirror)]
            assert (await c.fetch(found)).fetched == len(pieces)
        held = verify_batch(mirror.ledger.export(role="held"))
        assert held.owed() == {(_key(c), "USD"): PRICE for c in clients}
        assert all(ct.channel.payee == _key(p) for ct in held.channels)
        # a third node asking for the publisher's receipts is refused; for its own it gets none
        with pytest.raises(wire.WireError) as err:
            await billing.collect(third._open, _pid(mirror), third.ledger, publisher=_key(p))
        assert err.value.code == "forbidden"
        assert await third.collect_receipts(_pid(mirror)) == 0
        # the publisher's own peer collects them into its ledger; collecting again adds nothing
        assert await p.collect_receipts(_pid(mirror)) == 2
        assert await p.collect_receipts(_pid(mirror)) == 0
        n.cancel_scope.cancel()
    mine = verify_batch(p.ledger.export(), _key(p))
    assert mine.owed() == {(_key(c), "USD"): PRICE for c in clients}
    pubs = p.ledger.balances()["publishers"]
    assert [(x["role"], x["loads"], x["amount"]) for x in pubs] == [("in", 2, 2 * PRICE)]
    for c in clients:  # the payers signed exactly one license each, and no hosting (the mirror is free)
        lines = c.ledger.db.execute("SELECT kind, units, amount FROM lines").fetchall()
        assert lines == [("license", 1, PRICE)]


@pytest.mark.trio
async def test_a_license_price_over_the_limit_is_refused_before_any_byte_moves(tmp_path):
    p = make_node(tmp_path, "P", timeout=3.0)
    sm, pieces = _priced(p, 82)
    p.store.put_manifest(sm.raw)
    p.store.put_pieces(sm.id, list(enumerate(pieces)))
    c = make_node(tmp_path, "C", timeout=3.0, spending=SpendingLimits(per_load=PRICE - 1))
    async with trio.open_nursery() as n:
        await n.start(p.run)
        c.bootstrap = [p.addrs[0]]
        await n.start(c.run)
        with pytest.raises(SpendingLimitError) as err:
            await c.fetch(await c.find_manifest(sm.id))
        n.cancel_scope.cancel()
    assert err.value.limit == "per_load"
    assert p.server.served_bytes == 0 and p.bulk.served_bytes == 0
    assert c.ledger.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 0
