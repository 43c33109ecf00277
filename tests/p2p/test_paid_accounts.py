"""The payee's memory is bounded against free identities (docs/payments.md, "Credit window and
debtors"): a host keeps at most `max_accounts` payer accounts; when full it drops the settled ones
(nothing open, nothing owed), and with none settled it answers a new payer `busy` without touching
any other payer's account. On a real host with real libp2p clients, and with many identities
against the same host's biller."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from kvnet import identity
from kvnet.p2p import billing, wire
from kvnet.p2p.server import PIECES_PROTOCOL, HostingTerms
from kvnet.receipts import Line, hosting_cost
from tests.artifacts import fake_artifact
from tests.p2p.conftest import ask_frames, holding, make_node, pid, start_nodes

PIECE = 1 << 16
FEE = 64  # 4 micro-units per 64 KiB piece


def _identity() -> str:
    return ID.from_pubkey(create_new_key_pair().public_key).to_base58()


@pytest.mark.trio
async def test_a_full_account_table_drops_settled_payers_and_refuses_new_ones_busy(tmp_path):
    sm, pieces = fake_artifact(101, 1, piece_size=PIECE)
    h = holding(tmp_path, "H", sm, pieces, timeout=3.0, terms=HostingTerms(fee_per_mib=FEE))
    h.server.biller.max_accounts = 1
    a, b = make_node(tmp_path, "A", timeout=3.0), make_node(tmp_path, "B", timeout=3.0)
    req = {"v": 1, "manifest": sm.id, "ranges": [[0, 2]], "receipt": None}
    async with trio.open_nursery() as n:
        await start_nodes(n, h, a, b)
        assert (await ask_frames(a, h, PIECES_PROTOCOL, req))[0][-1] == {"done": True}  # A owes two pieces
        for _ in range(2):  # the table is full of an unsettled account: B is refused, A untouched
            got, _ = await ask_frames(b, h, PIECES_PROTOCOL, req)
            assert got[-1]["err"] == "busy"
        assert set(h.server.biller._debts) == {identity.public_bytes(a.key)}
        assert h.server.biller.owed(pid(a)) == 8 and h.server.biller.owed(pid(b)) == 0
        # A pays what it owes over /kvnet/receipts/1.0.0: settled, so B's account takes its place
        ch = a.ledger.open_channel(identity.public_bytes(h.key), "USD")
        paid = a.ledger.pay(ch, [Line(sm.id, "hosting", 2 * PIECE, hosting_cost(2 * PIECE, FEE))])
        frames, _ = await ask_frames(a, h, billing.RECEIPTS_PROTOCOL, {"v": 1, "op": "pay", "receipt": [paid.raw]})
        assert frames == [{"v": 1, "ok": True}]
        assert (await ask_frames(b, h, PIECES_PROTOCOL, req))[0][-1] == {"done": True}
        assert set(h.server.biller._debts) == {identity.public_bytes(b.key)}
        assert h.ledger.paid_by(identity.public_bytes(a.key), "USD") == 8  # A's receipt stays in the ledger
        n.cancel_scope.cancel()
    assert h.server.biller.refusals == {"busy": 2}

    # many identities against a small table: never more than the cap, refused only while none is settled
    biller = h.server.biller
    biller.max_accounts = 16
    peers = [_identity() for _ in range(64)]
    open_ = []
    for peer in peers:
        try:
            await biller.admit(peer, sm, [PIECE], [])
            open_.append(peer)
        except wire.WireError as exc:
            assert exc.code == "busy"
        assert len(biller._debts) <= 16
    assert len(open_) == 16 - 1  # B's account (settled or not) was one of the 16
    for peer in open_:  # each request ends unsent: nothing owed, all settled
        biller.finished(peer, PIECE, PIECE)
    for peer in peers[-8:]:  # new identities get accounts again
        await biller.admit(peer, sm, [PIECE], [])
    assert len(biller._debts) <= 16
