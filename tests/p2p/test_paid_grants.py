"""Grants sized to the credit window, and payment as pieces verify (docs/payments.md, "Credit window
and debtors"; docs/protocol.md, "Payments on requests"), on real libp2p hosts: a host grants the prefix
of a request that keeps what the payer owes within its window and says how many pieces in the answer
(a bulk grant's `granted`, a `pieces` answer's `done` frame); a bulk grant over the byte budget gets
the part that fits instead of a refusal; a streaming paid fetch never owes more than the window and
one piece; a
payer pays over `/kvnet/receipts/1.0.0` once PAY_EVERY verified bytes have accumulated."""

from __future__ import annotations

import pytest
import trio

from kvnet import identity
from kvnet.p2p import billing, bulk_wire
from kvnet.p2p.fetcher import Provider, fetch_pieces
from kvnet.p2p.server import PIECES_PROTOCOL, HostingTerms, ServeLimits
from kvnet.receipts import Line, hosting_cost, verify_batch
from tests.artifacts import fake_artifact
from tests.p2p.conftest import ask_frames, holding, make_node, pid, start_nodes

PIECE = 1 << 16
FEE = 64  # 4 micro-units per 64 KiB piece


def _key(node) -> bytes:
    return identity.public_bytes(node.key)


@pytest.mark.trio
async def test_a_host_grants_the_prefix_of_a_request_that_fits_its_credit_window(tmp_path):
    sm, pieces = fake_artifact(111, 1, piece_size=PIECE)
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE), credit_window=12)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        # a bulk grant of 8 pieces: three fit the window of 12 (4 each); the answer says so
        (ans,), _ = await ask_frames(c, h, bulk_wire.BULK_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[0, 8]],
                                                               "receipt": None})
        assert ans["granted"] == 3 and len(ans["token"]) == bulk_wire.TOKEN_BYTES
        assert h.server.biller.owed(pid(c)) == 12  # what it granted, not what it was asked for
        # at the window: one piece past it, and the `pieces` answer's end says so
        frames, got = await ask_frames(c, h, PIECES_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[8, 16]],
                                                         "receipt": None})
        assert [f.get("i") for f in frames[:-1]] == [8] and frames[-1] == {"done": True, "granted": 1}
        # over the window, with the grant not yet sent: pay first
        frames, got = await ask_frames(c, h, PIECES_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[9, 16]],
                                                         "receipt": None})
        assert frames[-1]["err"] == "payment_required" and got == 0
        # paying for the four: the next request is served the three that fit the window
        ch = c.ledger.open_channel(_key(h), "USD")
        paid = c.ledger.pay(ch, [Line(sm.id, "hosting", 4 * PIECE, hosting_cost(4 * PIECE, FEE))])
        frames, got = await ask_frames(c, h, PIECES_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[9, 16]],
                                                         "receipt": [paid.raw]})
        assert [f.get("i") for f in frames[:-1]] == [9, 10, 11] and got == 3 * PIECE
        assert frames[-1] == {"done": True, "granted": 3}
        n.cancel_scope.cancel()
    assert h.server.biller.peak_owed == 12 + 4  # the window and the one piece past it


@pytest.mark.trio
async def test_a_bulk_grant_over_the_byte_budget_gets_the_part_that_fits(tmp_path):
    sm, pieces = fake_artifact(112, 1, piece_size=PIECE)
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, serve_limits=ServeLimits(bytes_per_window=3 * PIECE,
                                                                                  window_s=3600.0))
    c = make_node(tmp_path, "C", timeout=3.0)
    req = {"v": 1, "manifest": sm.id, "ranges": [[0, 8]], "receipt": None}
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        (ans,), _ = await ask_frames(c, h, bulk_wire.BULK_PROTOCOL, req)
        assert ans["granted"] == 3  # was: refused whole with rate_limited
        (ans,), _ = await ask_frames(c, h, bulk_wire.BULK_PROTOCOL, req)
        assert ans["err"] == "rate_limited"  # nothing left of the budget
        n.cancel_scope.cancel()


@pytest.mark.trio
@pytest.mark.parametrize("bulk", [None, "tls"])
async def test_a_streaming_paid_fetch_never_owes_more_than_the_window_and_a_piece(tmp_path, bulk):
    sm, pieces = fake_artifact(113, 8, piece_size=PIECE)  # 128 pieces
    window = hosting_cost(8 * PIECE, FEE)  # eight pieces of credit; grants ask for up to 64
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE), credit_window=window)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        result = await c.fetch(await c.find_manifest(sm.id), bulk=bulk)
        n.cancel_scope.cancel()
    assert result.fetched == len(pieces) and result.providers[pid(h)]["dropped"] is None
    biller = h.server.biller
    # never more than one piece past the window (was: up to two 64-piece grants beyond it)
    assert 0 < biller.peak_owed <= window + hosting_cost(PIECE, FEE)
    assert "receipt_refused" not in biller.refusals and "debtor" not in biller.refusals
    batch = verify_batch(h.ledger.export(), _key(h))
    assert batch.owed() == {(_key(c), "USD"): c.ledger.paid_by(_key(c), "USD", payee=_key(h))}
    assert h.ledger.paid_by(_key(c), "USD") >= hosting_cost(sm.manifest.total_bytes, FEE)


@pytest.mark.trio
async def test_a_request_with_no_credit_left_waits_for_the_payment_of_the_bytes_on_their_way(tmp_path):
    """At its window, with bytes granted to the payer not yet sent, a host holds the next request
    until a payment lands and answers it with the credit that bought (was: at once, with the one piece
    past the window, which then kept a bulk connection's grant slot busy and the connection idle)."""
    sm, pieces = fake_artifact(116, 1, piece_size=PIECE)
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE), credit_window=16)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        biller = h.server.biller
        biller.hold_s = 60.0  # the payment below decides, not the clock
        # a bulk grant of the whole window (four pieces), not redeemed: granted, not yet sent
        (ans,), _ = await ask_frames(c, h, bulk_wire.BULK_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[0, 4]],
                                                               "receipt": None})
        assert ans["granted"] == 4 and biller.owed(pid(c)) == 16
        answer: list = []

        async def ask() -> None:
            answer.append(await ask_frames(c, h, PIECES_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[4, 8]],
                                                                   "receipt": None}))

        n.start_soon(ask)
        while biller.held == 0:  # the request is waiting (a state, not a duration)
            await trio.sleep(0.01)
        assert not answer
        ch = c.ledger.open_channel(_key(h), "USD")
        paid = c.ledger.pay(ch, [Line(sm.id, "hosting", 4 * PIECE, hosting_cost(4 * PIECE, FEE))])
        ok = await billing._ask(c._open, pid(h), {"v": 1, "op": "pay", "receipt": [paid.raw]})
        assert ok == {"v": 1, "ok": True}
        with trio.fail_after(10):
            while not answer:
                await trio.sleep(0.01)
        frames, got = answer[0]
        assert [f.get("i") for f in frames[:-1]] == [4, 5, 6, 7] and frames[-1] == {"done": True} and got == 4 * PIECE
        assert biller.held == 1 and biller.peak_owed == 16  # the four paid for, then four more: never past the window
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_last_payment_goes_as_the_last_piece_verifies_before_the_fetch_returns(tmp_path):
    """Once every byte a fetch expects has verified, the payer pays at once, beside the store's last
    commit; the fetch returns with nothing left for `settle` to pay, both ledgers already agreeing."""
    sm, pieces = fake_artifact(117, 4, piece_size=PIECE)  # 64 pieces
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE))
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        found = await c.find_manifest(sm.id)
        c.store.put_manifest(sm.raw)
        needed = list(range(len(pieces)))
        pay = c.payer.start(sm, found.providers, sm.manifest.total_bytes, c.scores)
        await fetch_pieces(sm, needed, pay.providers, c.runner, c._open, c.scores, bulk="tls", payments=pay)
        acct = pay.accounts[pid(h)]
        assert acct.unpaid == 0 and acct.unsent == {} and pay.last  # no `settle`: nothing left to pay
        n.cancel_scope.cancel()
    assert h.ledger.paid_by(_key(c), "USD") == hosting_cost(sm.manifest.total_bytes, FEE) == pay.totals()[pid(h)]


@pytest.mark.trio
async def test_a_payer_pays_over_the_receipts_protocol_as_verified_bytes_accumulate(tmp_path):
    sm, pieces = fake_artifact(114, 1, piece_size=PIECE)
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE))
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        pay = billing.FetchPayments(c.payer, sm, [Provider(pid(h), set(), fee_per_mib=FEE)])
        await n.start(pay.pay_along, c._open, 5.0)
        pay.verified(pid(h), billing.PAY_EVERY // 2)  # from a receiving thread, in a real fetch
        pay.verified(pid(h), billing.PAY_EVERY // 2)
        with trio.fail_after(10):  # no request follows: only `pay` can deliver the receipt
            while h.ledger.paid_by(_key(c), "USD") == 0 or pay.accounts[pid(h)].unsent:  # taken, and acknowledged
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert h.ledger.paid_by(_key(c), "USD") == hosting_cost(billing.PAY_EVERY, FEE) == pay.totals()[pid(h)]
    assert h.server.biller.pays == 1 and pay.accounts[pid(h)].unsent == {}


@pytest.mark.trio
async def test_a_payment_for_bytes_a_restarted_host_forgot_buys_no_new_credit(tmp_path):
    """A host's credit account is in memory: after a restart it knows nothing it served. A payer then
    paying for bytes it got before (its recorded receipts, resent) settles them in the ledger, but the
    host still serves it at most the window ahead of what it grants from now on (docs/payments.md,
    "Trust model": the loss bound of a restart)."""
    sm, pieces = fake_artifact(115, 1, piece_size=PIECE)
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE), credit_window=8)
    c = make_node(tmp_path, "C", timeout=3.0)
    async with trio.open_nursery() as n:
        await start_nodes(n, h, c)
        ch = c.ledger.open_channel(_key(h), "USD")
        before = c.ledger.pay(ch, [Line(sm.id, "hosting", 8 * PIECE, hosting_cost(8 * PIECE, FEE))])
        frames, got = await ask_frames(c, h, PIECES_PROTOCOL, {"v": 1, "manifest": sm.id, "ranges": [[0, 16]],
                                                         "receipt": [before.raw]})
        assert frames[-1] == {"done": True, "granted": 2} and got == 2 * PIECE  # the window, not 8 more pieces
        n.cancel_scope.cancel()
    assert h.ledger.paid_by(_key(c), "USD") == hosting_cost(8 * PIECE, FEE)  # the payment itself is kept
