"""The ledger's query functions that a kvnet-node and `kvnet ledger --json` share (real SQLite files):
the latest receipt per channel agrees between payer and payee, `signed_since` gives the price of one
fetch of one manifest (other manifests' and earlier receipts left out), `totals` counts per role."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import identity
from kvnet.ledger import EMPTY_REPORT, Ledger
from kvnet.receipts import Line

M1, M2 = b"\x01" * 32, b"\x02" * 32


def test_report_channels_and_the_price_of_one_fetch(tmp_path):
    payer_key, payee_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    payee = identity.public_bytes(payee_key)
    with Ledger(tmp_path / "payer.sqlite", payer_key) as p, Ledger(tmp_path / "payee.sqlite", payee_key) as h:
        assert p.report() == EMPTY_REPORT
        ch = p.open_channel(payee, "USD")
        h.accept(p.pay(ch, [Line(M1, "hosting", 1 << 20, 10)]).raw, payee)  # an earlier fetch
        mark = p.mark()
        h.accept(p.pay(ch, [Line(M2, "hosting", 3 << 20, 30)]).raw, payee)
        h.accept(p.pay(ch, [Line(M1, "hosting", 1 << 20, 10)]).raw, payee)  # another manifest's fetch
        h.accept(p.pay(ch, [Line(M2, "hosting", 1 << 20, 10), Line(M2, "license", 1, 500)]).raw, payee)
        assert p.signed_since(mark, M2) == {"USD": 540}
        assert p.signed_since(mark, M1) == {"USD": 10} and p.signed_since(p.mark(), M2) == {}
        mine, theirs = p.report(), h.report()
        assert h.signed_since(0, M2) == {}  # the payee signed nothing
        assert p.totals() == [{"role": "out", "currency": "USD", "receipts": 4, "amount": 560}]
        assert h.totals() == [{"role": "in", "currency": "USD", "receipts": 4, "amount": 560}]
    [out], [inn] = mine["channels"], theirs["channels"]
    assert (out["role"], inn["role"]) == ("out", "in")
    keep = ("channel", "payer", "payee", "currency", "seq", "cumulative", "time", "receipt")
    assert {k: out[k] for k in keep} == {k: inn[k] for k in keep}
    assert (out["seq"], out["cumulative"], out["payee"]) == (4, 560, payee.hex())
    assert set(mine) == set(EMPTY_REPORT) and mine["debtors"] == []
