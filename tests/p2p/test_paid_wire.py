"""The payment messages as docs/protocol.md states them, against a real host: the limits table is the
code's, a `receipt` field of the wrong shape is `malformed`, a `/kvnet/receipts/1.0.0` request that
is not a documented `pay` or `collect` is `malformed`, and a free node takes no hosting credit checks."""

from __future__ import annotations

import pytest
import trio

from kvnet.p2p import billing, wire
from kvnet.p2p.server import PIECES_PROTOCOL
from kvnet.receipts import MAX_RECEIPT_BYTES, hosting_cost
from tests.artifacts import ROOT, fake_artifact
from tests.p2p.conftest import make_node

SPEC = (ROOT / "docs" / "protocol.md").read_text()
PAYMENTS = (ROOT / "docs" / "payments.md").read_text()


def test_documented_payment_limits_are_the_code_s():
    assert f"| receipts per request (`pieces`, `bulk`, `pay`) | {billing.MAX_RECEIPTS_PER_REQUEST} |" in SPEC
    assert f"| receipts per `collect` answer | {billing.COLLECT_PAGE} |" in SPEC
    assert f"default the cost of {billing.DEFAULT_WINDOW_MIB} MiB at the host's fee" in SPEC
    assert f"**default the cost of {billing.DEFAULT_WINDOW_MIB} MiB at the host's fee**" in PAYMENTS
    assert billing.default_window(40) == hosting_cost(64 << 20, 40) == 64 * 40
    assert f"at most **{billing.PRICE_SLACK}×** the best one" in PAYMENTS
    assert f"at most **{billing.MAX_ACCOUNTS:,} payer accounts**" in PAYMENTS
    assert f"**{billing.LICENSE_SHOWN_MAX_AGE_S:,} s**" in PAYMENTS and f"**{billing.PAY_EVERY >> 20} MiB**" in PAYMENTS
    assert f"already keeps {billing.MAX_ACCOUNTS:,} payer accounts" in SPEC
    assert f"at most\n{billing.MAX_SPEEDS:,} providers" in PAYMENTS
    assert {"payment_required", "debtor", "receipt_refused", "forbidden"} <= wire.ERROR_CODES


async def _answer(client, host, protocol: str, msg: dict) -> dict:
    stream = await client.host.new_stream(host.peer_id, [protocol])
    try:
        with trio.fail_after(5):
            await wire.write_frame(stream, msg)
            return await wire.read_frame(stream, wire.MAX_RESPONSE)
    finally:
        await stream.close()


@pytest.mark.trio
async def test_receipt_fields_of_the_wrong_shape_are_malformed(tmp_path):
    sm, pieces = fake_artifact(95, 1, piece_size=1 << 16)
    h = make_node(tmp_path, "H", timeout=3.0)
    h.store.put_manifest(sm.raw)
    h.store.put_pieces(sm.id, list(enumerate(pieces)))
    c = make_node(tmp_path, "C", timeout=3.0)
    req = {"v": 1, "manifest": sm.id, "ranges": [[0, 1]]}
    bad = {"a bin, not an array": b"pay", "an empty array": [], "five receipts": [b"r"] * 5,
           "not binary": ["r"], "oversized": [b"x" * (MAX_RECEIPT_BYTES + 1)]}
    async with trio.open_nursery() as n:
        await n.start(h.run)
        c.bootstrap = [h.addrs[0]]
        await n.start(c.run)
        for what, receipt in bad.items():
            got = await _answer(c, h, PIECES_PROTOCOL, {**req, "receipt": receipt})
            assert got["err"] == "malformed", what
        garbage = await _answer(c, h, PIECES_PROTOCOL, {**req, "receipt": [b"not a receipt"]})
        assert garbage["err"] == "receipt_refused" and garbage["rule"] == "malformed"
        for what, msg in {"no op": {"v": 1}, "unknown op": {"v": 1, "op": "steal"},
                          "pay without receipts": {"v": 1, "op": "pay"},
                          "collect with an unknown field": {"v": 1, "op": "collect", "publisher": bytes(32),
                                                            "after": 0, "x": 1},
                          "collect after -1": {"v": 1, "op": "collect", "publisher": bytes(32), "after": -1}}.items():
            got = await _answer(c, h, billing.RECEIPTS_PROTOCOL, msg)
            assert got["err"] == "malformed", what
        # a free host grants without any payment, however much it served
        for start in range(0, len(pieces), 8):
            got = await _answer(c, h, PIECES_PROTOCOL, {**req, "ranges": [[start, min(start + 8, len(pieces))]],
                                                        "receipt": None})
            assert "err" not in got
        n.cancel_scope.cancel()
    assert h.server.biller.refusals == {"receipt_refused": 1} and h.ledger.debtors() == []
