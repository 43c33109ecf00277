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
from kvnet.p2p.server import PIECES_PROTOCOL, HostingTerms
from kvnet.receipts import Line, verify_batch
from tests.artifacts import fake_artifact
from tests.p2p.conftest import found_by, make_node

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


async def _pieces(client, host, sm, ranges, receipt=None) -> list[dict]:
    """A raw `pieces` request's frames (piece bytes read and dropped), up to `done` or an error."""
    stream = await client.host.new_stream(host.peer_id, [PIECES_PROTOCOL])
    frames = []
    try:
        with trio.fail_after(5):
            await wire.write_frame(stream, {"v": 1, "manifest": sm.id, "ranges": ranges, "receipt": receipt})
            while True:
                head = await wire.read_frame(stream, wire.MAX_RESPONSE)
                frames.append(head)
                if "n" in head:
                    await wire.read_exact(stream, head["n"])
                if "done" in head or "err" in head:
                    return frames
    finally:
        await stream.close()


def _holding(tmp_path, name: str, sm, pieces):
    node = make_node(tmp_path, name, timeout=3.0, terms=HostingTerms(fee_per_mib=0))
    node.store.put_manifest(sm.raw)
    node.store.put_pieces(sm.id, list(enumerate(pieces)))
    return node


@pytest.mark.trio
async def test_a_host_refuses_a_priced_load_without_its_license_and_serves_it_with_one(tmp_path):
    p = make_node(tmp_path, "P", timeout=3.0)
    sm, pieces = _priced(p, 83)
    free, free_pieces = fake_artifact(84, 1, piece_size=PIECE)  # no license price
    mirror, other = _holding(tmp_path, "M", sm, pieces), _holding(tmp_path, "O", sm, pieces)
    mirror.store.put_manifest(free.raw)
    mirror.store.put_pieces(free.id, list(enumerate(free_pieces)))
    c = make_node(tmp_path, "C", timeout=3.0)
    n_pieces = len(sm.manifest.pieces)
    async with trio.open_nursery() as n:
        await n.start(mirror.run)
        for node in (other, c):
            node.bootstrap = [mirror.addrs[0]]
            await n.start(node.run)
        # without a license receipt: refused, naming the license; a free manifest needs none
        got = await _pieces(c, mirror, sm, [[0, 1]])
        assert got[-1]["err"] == "payment_required" and got[-1]["license"] == sm.id and "license" in got[-1]["msg"]
        assert (await _pieces(c, mirror, free, [[0, 1]]))[-1] == {"done": True}
        # with one: the whole load is served, and the host keeps the receipt for the publisher
        ch = c.ledger.open_channel(_key(p), "USD", _key(mirror))
        load1 = c.ledger.pay(ch, [Line(sm.id, "license", 1, PRICE)])
        assert (await _pieces(c, mirror, sm, [[0, n_pieces]], [load1.raw]))[-1] == {"done": True}
        assert verify_batch(mirror.ledger.export(role="held")).owed() == {(_key(c), "USD"): PRICE}
        # one license is one load: asking for its pieces again needs the next one
        assert (await _pieces(c, mirror, sm, [[0, 1]]))[-1]["err"] == "payment_required"
        # a license receipt another host holds (the next load's, on the same channel) licenses one load here
        load2 = c.ledger.pay(ch, [Line(sm.id, "license", 1, PRICE)])
        assert (await _pieces(c, other, sm, [[0, n_pieces]], [load2.raw]))[-1] == {"done": True}
        assert (await _pieces(c, other, sm, [[0, 1]], [load2.raw]))[-1]["err"] == "payment_required"  # only one
        # an underpriced license is refused by rule, and licenses nothing
        cheap = c.ledger.pay(ch, [Line(sm.id, "license", 1, PRICE - 1)])
        got = await _pieces(c, other, sm, [[0, 1]], [cheap.raw])
        assert got[-1]["err"] == "receipt_refused" and got[-1]["rule"] == "wrong_amount"
        n.cancel_scope.cancel()
    assert verify_batch(other.ledger.export(role="held")).owed() == {}  # nothing held there: it is the mirror's


@pytest.mark.trio
async def test_a_load_from_two_hosts_pays_its_license_once_and_both_require_it(tmp_path):
    p = make_node(tmp_path, "P", timeout=3.0)
    sm, pieces = _priced(p, 85)
    a, b = _holding(tmp_path, "A", sm, pieces), _holding(tmp_path, "B", sm, pieces)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await n.start(a.run)
        for node in (b, c, p):
            node.bootstrap = [a.addrs[0]]
            await n.start(partial(node.run, announce=node is not c))
        found = await found_by(c, sm.id, {_pid(a), _pid(b)})
        result = await c.fetch(found)
        assert result.fetched == len(pieces)
        assert all(st["dropped"] is None for st in result.providers.values())
        collected = sum([await p.collect_receipts(_pid(h)) for h in (a, b)])
        n.cancel_scope.cancel()
    assert c.ledger.db.execute("SELECT kind, units, amount FROM lines").fetchall() == [("license", 1, PRICE)]
    assert collected == 1  # the same receipt at both hosts: the publisher holds it once
    assert verify_batch(p.ledger.export(), _key(p)).owed() == {(_key(c), "USD"): PRICE}
    assert a.server.biller.refusals == b.server.biller.refusals == {}  # it came with each first request
