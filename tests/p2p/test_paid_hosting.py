"""Paid hosting between real libp2p nodes on loopback (docs/payments.md, "On the wire"): a fetch pays
for every verified byte over `pieces` streams and over a bulk connection, both ledgers agree, the
payee's batch verifies offline; a small credit window keeps what the payee serves ahead of its receipts
within it and the fetch still completes; a payer that stops paying is cut off, recorded as a debtor and refused until it
pays; a host that bills more than its offer is refused and scored down with nothing counted; a fetch
over a spending limit is refused before any byte moves; a cheaper honest host is chosen."""

from __future__ import annotations

import pytest
import trio

from kvnet import identity
from kvnet.ledger import SpendingLimitError, SpendingLimits
from kvnet.p2p import billing, wire
from kvnet.p2p.billing import Candidate, rank_by_price
from kvnet.p2p.fetcher import FetchError
from kvnet.p2p.server import PIECES_PROTOCOL, HostingTerms
from kvnet.receipts import Line, hosting_cost, verify_batch
from tests.artifacts import fake_artifact
from tests.p2p.conftest import found_by, holding, make_node, pid, start_nodes

PIECE = 1 << 16  # 64 KiB pieces: 64 pieces from 4 MiB
FEE = 40  # micro-units per MiB


def _holding(tmp_path, name: str, sm, pieces, fee: int = FEE, **kw):
    return holding(tmp_path, name, sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=fee), **kw)


_start, _pid = start_nodes, pid


def _key(node) -> bytes:
    return identity.public_bytes(node.key)


def _channels(ledger, role: str) -> list[tuple]:
    """(channel id, payer, payee, last seq, cumulative) of the ledger's channels in `role`."""
    return ledger.db.execute("SELECT id, payer, payee, last_seq, cumulative FROM channels WHERE role=? AND "
                             "last_seq>0 ORDER BY id", (role,)).fetchall()


def _hosting_bytes(ledger, role: str) -> int:
    return ledger.db.execute("SELECT COALESCE(SUM(l.units), 0) FROM lines l JOIN receipts r ON r.id=l.receipt "
                             "JOIN channels c ON c.id=r.channel WHERE c.role=? AND l.kind='hosting'",
                             (role,)).fetchone()[0]


def _assert_ledgers_agree(payer, payee, total_bytes: int) -> None:
    out, got = _channels(payer.ledger, "out"), _channels(payee.ledger, "in")
    assert out == got and len(out) == 1  # one hosting channel, the same latest receipt on both sides
    _, who, to, seq, cumulative = out[0]
    assert (who, to) == (_key(payer), _key(payee))
    assert _hosting_bytes(payer.ledger, "out") == _hosting_bytes(payee.ledger, "in") == total_bytes
    # per-line rounding: at most one micro-unit per receipt above one line for everything
    assert hosting_cost(total_bytes, FEE) <= cumulative <= hosting_cost(total_bytes, FEE) + seq
    batch = verify_batch(payee.ledger.export(), _key(payee))  # the payee's settlement batch, offline
    assert batch.owed() == {(_key(payer), "USD"): cumulative}
    assert payee.ledger.debtors() == []


@pytest.mark.trio
@pytest.mark.parametrize("bulk", [None, "tls"])
async def test_a_paid_fetch_pays_for_every_verified_byte_and_both_ledgers_agree(tmp_path, bulk):
    sm, pieces = fake_artifact(71, 4, piece_size=PIECE)
    h = _holding(tmp_path, "H", sm, pieces)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, h, c)
        found = await c.find_manifest(sm.id)
        assert [(p.fee_per_mib, p.currency) for p in found.providers] == [(FEE, "USD")]  # from the offer
        result = await c.fetch(found, bulk=bulk)
        n.cancel_scope.cancel()
    assert result.fetched == len(pieces)
    _assert_ledgers_agree(c, h, sm.manifest.total_bytes)
    seq = _channels(c.ledger, "out")[0][3]
    # over streams a receipt rides on each request for the next group of pieces: several; over bulk a
    # lone provider grants all 64 pieces at once, within the default window, so the one receipt of
    # `settle` (or a few, paid along the fetch) covers them
    assert seq > 2 if bulk is None else seq >= 1
    assert h.server.biller.refusals == {}  # the default window (64 MiB) was never reached


@pytest.mark.trio
@pytest.mark.parametrize("bulk", [None, "tls"])
async def test_a_small_credit_window_keeps_the_payee_within_it_and_the_fetch_completes(tmp_path, bulk):
    sm, pieces = fake_artifact(72, 16, piece_size=PIECE)  # several grants, even at 64 pieces each
    window = hosting_cost(4 * PIECE, FEE)  # four pieces of credit; requests ask for more than that
    h = _holding(tmp_path, "H", sm, pieces, credit_window=window)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, h, c)
        result = await c.fetch(await c.find_manifest(sm.id), bulk=bulk)
        n.cancel_scope.cancel()
    assert result.fetched == len(pieces) and result.providers[_pid(h)]["dropped"] is None
    # grants were cut to the window (and one piece): the payee never served further ahead of the receipts
    assert h.server.biller.peak_owed <= window + hosting_cost(PIECE, FEE)
    assert "receipt_refused" not in h.server.biller.refusals
    _assert_ledgers_agree(c, h, sm.manifest.total_bytes)


async def _ask_pieces(client, host, sm, ranges, receipt=None) -> tuple[list[dict], int]:
    """A raw `pieces` request: its frames (piece headers, done or an error) and the piece bytes read."""
    stream = await client.host.new_stream(host.peer_id, [PIECES_PROTOCOL])
    frames, got = [], 0
    try:
        with trio.fail_after(5):
            await wire.write_frame(stream, {"v": 1, "manifest": sm.id, "ranges": ranges, "receipt": receipt})
            while True:
                head = await wire.read_frame(stream, wire.MAX_REQUEST)
                frames.append(head)
                if "n" in head:
                    got += len(await wire.read_exact(stream, head["n"]))
                if "done" in head or "err" in head:
                    return frames, got
    finally:
        await stream.close()


@pytest.mark.trio
async def test_a_payer_that_stops_paying_is_cut_off_as_a_debtor_until_it_pays(tmp_path):
    sm, pieces = fake_artifact(73, 1, piece_size=PIECE)
    fee = 64  # 4 micro-units per 64 KiB piece
    h = _holding(tmp_path, "H", sm, pieces, fee=fee, credit_window=8)  # two pieces of credit
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, h, c)
        frames, got = await _ask_pieces(c, h, sm, [[0, 2]])  # within the window: served
        assert frames[-1] == {"done": True} and got == 2 * PIECE
        frames, got = await _ask_pieces(c, h, sm, [[2, 4]])  # at the window: one piece past it, no more
        assert frames[-1] == {"done": True, "granted": 1} and got == PIECE
        # over the window, paying nothing: told to pay, as are the next UNPAID_ASKS_BEFORE_DEBTOR
        # requests paying nothing (they could have been sent before the payer saw the first refusal);
        # one more, still paying nothing: cut off as a debtor, and it stays one
        codes = ["payment_required"] * (1 + billing.UNPAID_ASKS_BEFORE_DEBTOR) + ["debtor", "debtor"]
        for code in codes:
            frames, got = await _ask_pieces(c, h, sm, [[3, 5]])
            assert frames[-1]["err"] == code and got == 0
        assert [(d["peer"], d["currency"]) for d in h.ledger.debtors()] == [(_key(c), "USD")]
        assert h.ledger.paid_by(_key(c), "USD") == 0 and h.server.biller.owed(_pid(c)) == 12
        # it pays for the three pieces it got: served again, no longer a debtor
        ch = c.ledger.open_channel(_key(h), "USD")
        paid = c.ledger.pay(ch, [Line(sm.id, "hosting", 3 * PIECE, hosting_cost(3 * PIECE, fee))])
        frames, got = await _ask_pieces(c, h, sm, [[3, 5]], [paid.raw])
        assert frames[-1] == {"done": True} and got == 2 * PIECE
        assert h.ledger.debtors() == [] and h.ledger.paid_by(_key(c), "USD") == 12
        # a receipt that underpays is refused by rule, and nothing is counted
        short = c.ledger.pay(ch, [Line(sm.id, "hosting", 2 * PIECE, 1)])
        frames, _ = await _ask_pieces(c, h, sm, [[5, 7]], [short.raw])
        assert frames[-1]["err"] == "receipt_refused" and frames[-1]["rule"] == "wrong_amount"
        assert h.ledger.paid_by(_key(c), "USD") == 12
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_host_that_bills_more_than_its_offer_is_refused_and_scored_down(tmp_path):
    sm, pieces = fake_artifact(74, 4, piece_size=PIECE)
    h = _holding(tmp_path, "H", sm, pieces, fee=10)  # its offer quotes 10 per MiB ...
    h.server.biller.fee_per_mib = 40  # ... and it bills 40
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, h, c)
        found = await c.find_manifest(sm.id)
        with pytest.raises(FetchError) as err:
            await c.fetch(found, bulk=None)
        n.cancel_scope.cancel()
    assert "overbilled" in str(err.value)
    row = c.scores.db.execute("SELECT score, last_reason FROM scores WHERE peer=?", (_pid(h),)).fetchone()
    assert row[0] < 0 and row[1] == "overbilled"
    assert _channels(h.ledger, "in") == []  # the host counted none of the refused receipts
    assert h.server.biller.refusals.get("receipt_refused", 0) >= 1


@pytest.mark.trio
async def test_a_fetch_over_a_spending_limit_is_refused_before_any_byte_moves(tmp_path):
    sm, pieces = fake_artifact(75, 1, piece_size=PIECE)
    h = _holding(tmp_path, "H", sm, pieces, fee=FEE)
    limits = {"per_mib": SpendingLimits(per_mib=FEE - 1),
              "total_per_day": SpendingLimits(total_per_day=hosting_cost(len(pieces) * PIECE, FEE) - 1),
              "currency": SpendingLimits(currency="EUR")}
    clients = {name: make_node(tmp_path, f"C-{name}", timeout=3.0, spending=lim) for name, lim in limits.items()}
    async with trio.open_nursery() as n:
        await _start(n, h, *clients.values())
        for name, c in clients.items():
            found = await c.find_manifest(sm.id)
            with pytest.raises(SpendingLimitError) as err:
                await c.fetch(found)
            assert err.value.limit == name
            assert c.store.present_pieces(sm.id) == set()
        n.cancel_scope.cancel()
    assert h.server.served_bytes == 0 and h.bulk.served_bytes == 0  # not one piece left the host
    assert _channels(h.ledger, "in") == []


@pytest.mark.trio
async def test_a_cheaper_honest_host_is_chosen(tmp_path):
    sm, pieces = fake_artifact(76, 2, piece_size=PIECE)
    cheap = _holding(tmp_path, "cheap", sm, pieces, fee=10)
    dear = _holding(tmp_path, "dear", sm, pieces, fee=100)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, dear, cheap, c)
        found = await found_by(c, sm.id, {_pid(cheap), _pid(dear)})
        result = await c.fetch(found)
        n.cancel_scope.cancel()
    assert result.providers[_pid(cheap)]["pieces"] == len(pieces)
    assert _pid(dear) not in result.providers and dear.ledger.paid_by(_key(c), "USD") == 0


@pytest.mark.trio
async def test_a_pricier_host_still_serves_what_the_cheap_one_lacks(tmp_path):
    sm, pieces = fake_artifact(78, 2, piece_size=PIECE)
    half = len(pieces) // 2
    cheap = make_node(tmp_path, "cheap", timeout=3.0, terms=HostingTerms(fee_per_mib=10))
    cheap.store.put_manifest(sm.raw)
    cheap.store.put_pieces(sm.id, list(enumerate(pieces[:half])))
    dear = _holding(tmp_path, "dear", sm, pieces, fee=100)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, dear, cheap, c)
        result = await c.fetch(await found_by(c, sm.id, {_pid(cheap), _pid(dear)}))
        n.cancel_scope.cancel()
    assert result.fetched == len(pieces)
    assert result.providers[_pid(dear)]["pieces"] >= len(pieces) - half  # at least what only it holds
    for host in (cheap, dear):  # each paid for what it delivered, at its own fee
        out = c.ledger.paid_by(_key(c), "USD", payee=_key(host))
        assert out == host.ledger.paid_by(_key(c), "USD") > 0


@pytest.mark.trio
async def test_a_cheap_host_that_cannot_serve_falls_back_to_a_pricier_one(tmp_path):
    """A free host offers every piece, then has none (it evicted them, or lied): the fetch it was
    chosen for fails there and goes on with the pricier host it had left out for its price, which
    serves and is paid; nothing is paid to the free host, which is scored down."""
    sm, pieces = fake_artifact(79, 2, piece_size=PIECE)
    free = _holding(tmp_path, "free", sm, pieces, fee=0)
    dear = _holding(tmp_path, "dear", sm, pieces, fee=100)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, dear, free, c)
        found = await found_by(c, sm.id, {_pid(free), _pid(dear)})
        assert [p.peer for p in c.payer.start(sm, found.providers, sm.manifest.total_bytes,
                                              c.scores).providers] == [_pid(free)]  # dear left out
        free.store.delete(sm.id, force=True)  # after its offer: every request is answered "missing"
        result = await c.fetch(found)
        n.cancel_scope.cancel()
    assert c.store.missing_pieces(sm.id) == [] and result.providers[_pid(dear)]["pieces"] == len(pieces)
    out = c.ledger.paid_by(_key(c), "USD", payee=_key(dear))
    assert out == dear.ledger.paid_by(_key(c), "USD") >= hosting_cost(sm.manifest.total_bytes, 100)
    assert c.ledger.paid_by(_key(c), "USD", payee=_key(free)) == 0
    assert c.scores.get(_pid(free)) < 0  # it offered what it could not serve (here: `protocol`, no manifest)


@pytest.mark.trio
async def test_a_small_artifact_from_two_hosts_comes_and_is_paid_once(tmp_path, monkeypatch):
    """A 4-piece artifact is all endgame (at most ENDGAME_PIECES left from the start): a piece on its
    way from a healthy host is not asked of the second one before ENDGAME_AFTER_S (set long here, so
    that no machine is slow enough to reach it), so every byte comes once and is paid once."""
    from kvnet.p2p import fetcher

    monkeypatch.setattr(fetcher, "ENDGAME_AFTER_S", 60.0)
    sm, pieces = fake_artifact(80, 1, piece_size=1 << 18)  # 4 pieces of 256 KiB
    a, b = (_holding(tmp_path, name, sm, pieces, fee=FEE) for name in ("A", "B"))
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await _start(n, a, b, c)
        found = await found_by(c, sm.id, {_pid(a), _pid(b)})
        result = await c.fetch(found)
        n.cancel_scope.cancel()
    assert result.fetched == len(pieces) and result.received_bytes == sm.manifest.total_bytes
    units = sum(host.ledger.db.execute("SELECT COALESCE(SUM(units), 0) FROM lines WHERE kind='hosting'")
                .fetchone()[0] for host in (a, b))
    assert units == sm.manifest.total_bytes  # the two hosts together were paid for each byte once


def test_price_weighs_with_speed_and_score():
    # a cheaper host a little slower wins; one much slower, or with a bad record, loses
    assert rank_by_price([Candidate("a", 100, mb_per_s=100), Candidate("b", 50, mb_per_s=80)])[0][0] == "b"
    assert rank_by_price([Candidate("a", 100, mb_per_s=100), Candidate("b", 50, mb_per_s=20)])[0][0] == "a"
    assert rank_by_price([Candidate("a", 100), Candidate("b", 50, score=-10)])[0][0] == "a"
    assert rank_by_price([Candidate("a", 0), Candidate("b", 0)])[0][1] == 1.0


@pytest.mark.trio
async def test_a_receipt_recorded_but_never_sent_is_resent_when_the_payee_asks(tmp_path):
    """A payer that recorded a receipt and died before sending it (its next receipt skips a seq at the
    payee): the payee answers `skipped_sequence` with its latest seq, the payer resends, both agree."""
    sm, pieces = fake_artifact(77, 2, piece_size=PIECE)
    h = _holding(tmp_path, "H", sm, pieces)
    c = make_node(tmp_path, "C", timeout=3.0)
    ch = c.ledger.open_channel(_key(h), "USD")
    lost = c.ledger.pay(ch, [Line(sm.id, "hosting", PIECE, hosting_cost(PIECE, FEE))])  # never sent
    async with trio.open_nursery() as n:
        await _start(n, h, c)
        result = await c.fetch(await c.find_manifest(sm.id), bulk=None)
        n.cancel_scope.cancel()
    assert result.fetched == len(pieces)
    # skipped_sequence (once per request already on its way when the first answer came), then resent
    refusals = h.server.biller.refusals
    assert set(refusals) == {"receipt_refused"} and 1 <= refusals["receipt_refused"] <= 4
    assert h.ledger.latest(ch.id).seq == c.ledger.latest(ch.id).seq > 1
    held = h.ledger.db.execute("SELECT raw FROM receipts WHERE seq=1").fetchone()[0]
    assert held == lost.raw  # the very receipt that was recorded, not a new one for the same seq
    assert _channels(c.ledger, "out") == _channels(h.ledger, "in")
