"""kvnet.receipts: the receipt format on its own, settlement batches offline, and the price helpers.

Every refusal is checked by its `rule`, not by message text, so a check that moves or changes name fails.
"""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, identity, receipts
from kvnet.hashing import b3
from kvnet.receipts import Channel, Line, ReceiptError

M1, M2 = b"\x01" * 32, b"\x02" * 32


@pytest.fixture
def payer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def channel(payer) -> Channel:
    return Channel.new(identity.public_bytes(payer), identity.public_bytes(Ed25519PrivateKey.generate()), "USD")


def _lines(*amounts: int) -> list[Line]:
    return [Line(M1, "hosting", 1 << 20, a) for a in amounts]


def _rule(exc: pytest.ExceptionInfo) -> str:
    return exc.value.rule


def test_sign_then_parse_round_trips(payer, channel):
    sr = receipts.sign_receipt(payer, channel, 1, 15, [Line(M1, "hosting", 4096, 5), Line(M2, "license", 1, 10)],
                               when=1_800_000_000)
    back = receipts.parse_receipt(sr.raw)
    assert back.receipt == sr.receipt and back.id == b3(sr.raw) == sr.id
    body = canonical.decode(sr.raw)
    assert body["channel"] == channel.id == b3(canonical.encode(channel.to_map()))
    assert body["lines"][0] == {"manifest": M1, "kind": "hosting", "bytes": 4096, "amount": 5}
    assert body["lines"][1] == {"manifest": M2, "kind": "license", "loads": 1, "amount": 10}


def test_only_the_payer_can_sign(channel):
    with pytest.raises(ReceiptError) as exc:
        receipts.sign_receipt(Ed25519PrivateKey.generate(), channel, 1, 5, _lines(5))
    assert _rule(exc) == "bad_signature"


def _resign(key: Ed25519PrivateKey, body: dict) -> bytes:
    """A body changed by hand, signed properly: what a malicious payer could send."""
    body = {k: v for k, v in body.items() if k != "sig"}
    sig = key.sign(receipts.SIG_DOMAIN + canonical.encode(body))
    return canonical.encode({**body, "sig": sig})


def test_another_keys_signature_is_refused(payer, channel):
    body = canonical.decode(receipts.sign_receipt(payer, channel, 1, 5, _lines(5)).raw)
    forged = _resign(Ed25519PrivateKey.generate(), body)
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(forged)
    assert _rule(exc) == "bad_signature"


def test_a_changed_amount_breaks_the_signature(payer, channel):
    body = canonical.decode(receipts.sign_receipt(payer, channel, 1, 5, _lines(5)).raw)
    body["cumulative"] = 6
    body["lines"][0]["amount"] = 6
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(canonical.encode(body))
    assert _rule(exc) == "bad_signature"


def test_a_channel_id_that_is_not_its_fields_hash_is_refused(payer, channel):
    body = canonical.decode(receipts.sign_receipt(payer, channel, 1, 5, _lines(5)).raw)
    body["channel"] = b"\x00" * 32
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(_resign(payer, body))
    assert _rule(exc) == "wrong_channel"


@pytest.mark.parametrize("change", [
    "drop field", "extra field", "seq as str", "bool as int", "zero seq", "no lines", "bad kind",
    "hosting line with loads", "negative amount", "short manifest", "payee is payer", "short nonce",
    "not a map", "65 lines",
])
def test_malformed_receipts_are_refused(payer, channel, change):
    body = canonical.decode(receipts.sign_receipt(payer, channel, 1, 5, _lines(5)).raw)
    line = body["lines"][0]
    edits = {
        "drop field": lambda: body.pop("time"),
        "extra field": lambda: body.update(memo="hi"),
        "seq as str": lambda: body.update(seq="1"),
        "bool as int": lambda: body.update(seq=True),
        "zero seq": lambda: body.update(seq=0),
        "no lines": lambda: body.update(lines=[]),
        "bad kind": lambda: line.update(kind="tip"),
        "hosting line with loads": lambda: (line.pop("bytes"), line.update(loads=1)),
        "negative amount": lambda: (line.update(amount=-1), body.update(cumulative=0)),
        "short manifest": lambda: line.update(manifest=b"\x01" * 31),
        "payee is payer": lambda: body.update(payee=body["payer"]),
        "short nonce": lambda: body.update(nonce=b"\x00" * 15),
        "65 lines": lambda: body.update(lines=[dict(line, amount=0) for _ in range(65)]),
    }
    raw = canonical.encode([1, 2]) if change == "not a map" else None
    if raw is None:
        edits[change]()
        raw = _resign(payer, body)
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(raw)
    assert _rule(exc) == "malformed", exc.value


def test_not_msgpack_is_malformed():
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(b"\xc1\x00garbage")
    assert _rule(exc) == "malformed"


def test_a_non_canonical_encoding_of_a_valid_receipt_is_refused(payer, channel):
    raw = receipts.sign_receipt(payer, channel, 1, 5, _lines(5)).raw
    value = canonical.decode(raw)
    # the same value, keys in reverse order: msgpack reads it, the re-encoding check refuses it
    unsorted = msgpack.packb(dict(reversed(list(value.items()))), use_bin_type=True)
    assert unsorted != raw and msgpack.unpackb(unsorted) == msgpack.unpackb(raw)
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(unsorted)
    assert _rule(exc) == "non_canonical"


def test_oversized_receipts_are_refused_before_decoding(payer, channel):
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(b"\x00" * (receipts.MAX_RECEIPT_BYTES + 1))
    assert _rule(exc) == "oversized"
    body = canonical.decode(receipts.sign_receipt(payer, channel, 1, 5, _lines(5)).raw)
    body["currency"] = "U" * 16
    big = _resign(payer, {**body, "lines": body["lines"] * 64, "memo": b"x" * 4000})
    assert len(big) > receipts.MAX_RECEIPT_BYTES
    with pytest.raises(ReceiptError) as exc:
        receipts.parse_receipt(big)
    assert _rule(exc) == "oversized"


def test_the_largest_legal_receipt_fits_the_size_limit(payer):
    ch = Channel.new(identity.public_bytes(payer), b"\x07" * 32, "X" * receipts.MAX_CURRENCY_BYTES)
    lines = [Line(bytes([i]) * 32, "hosting", 2**63 - 1, 2**56) for i in range(receipts.MAX_LINES)]
    sr = receipts.sign_receipt(payer, ch, 2**62, 2**63 - 1, lines, when=2**63 - 1)
    assert len(sr.raw) <= receipts.MAX_RECEIPT_BYTES
    assert receipts.parse_receipt(sr.raw).receipt.seq == 2**62


def test_the_first_receipt_lines_must_add_up(payer, channel):
    with pytest.raises(ReceiptError) as exc:
        receipts.sign_receipt(payer, channel, 1, 6, _lines(5))
    assert _rule(exc) == "lines_do_not_add_up"


def test_check_next_names_each_rule(payer, channel):
    r1 = receipts.sign_receipt(payer, channel, 1, 5, _lines(5))
    r2 = receipts.sign_receipt(payer, channel, 2, 8, _lines(3))
    receipts.check_next(1, 5, r1.id, r2)
    cases = {
        "replayed": r1,
        "repeated_sequence": receipts.sign_receipt(payer, channel, 1, 5, _lines(2, 3)),
        "skipped_sequence": receipts.sign_receipt(payer, channel, 3, 8, _lines(3)),
        "lower_cumulative": receipts.sign_receipt(payer, channel, 2, 4, _lines(0)),
        "lines_do_not_add_up": receipts.sign_receipt(payer, channel, 2, 9, _lines(3)),
    }
    for rule, sr in cases.items():
        with pytest.raises(ReceiptError) as exc:
            receipts.check_next(1, 5, r1.id, sr)
        assert _rule(exc) == rule
    with pytest.raises(ReceiptError) as exc:
        receipts.check_next(0, 0, None, r2)
    assert _rule(exc) == "skipped_sequence"


def test_hosting_cost_rounds_up_per_line_and_license_cost_multiplies():
    mib = 1 << 20
    assert receipts.hosting_cost(0, 100) == 0
    assert receipts.hosting_cost(mib, 100) == 100
    assert receipts.hosting_cost(mib + 1, 100) == 101  # any fraction of a micro-unit rounds up
    assert receipts.hosting_cost(1, 1) == 1
    assert receipts.hosting_cost(mib // 2, 3) == 2  # 1.5 -> 2
    assert receipts.hosting_cost(256 * mib, 7) == 1792
    assert receipts.license_cost(3, 1500) == 4500
    with pytest.raises(ValueError):
        receipts.hosting_cost(-1, 1)


# -- batches ----------------------------------------------------------------------------------------


def _chain(payer, channel, n: int) -> list[bytes]:
    out, total = [], 0
    for i in range(1, n + 1):
        total += i
        out.append(receipts.sign_receipt(payer, channel, i, total, _lines(i)).raw)
    return out


def test_a_batch_verifies_and_sums_the_latest_cumulative_per_payer(payer, channel):
    other = Ed25519PrivateKey.generate()
    ch2 = Channel.new(identity.public_bytes(other), channel.payee, "USD")
    raw = receipts.encode_batch(channel.payee, 1, [_chain(payer, channel, 4), _chain(other, ch2, 2)])
    s = receipts.verify_batch(raw)
    assert s.owed() == {(channel.payer, "USD"): 10, (ch2.payer, "USD"): 3}
    assert {c.latest_seq for c in s.channels} == {4, 2}


@pytest.mark.parametrize("fault,rule", [
    ("gap", "skipped_sequence"), ("reorder", "skipped_sequence"), ("duplicate", "replayed"),
    ("other payee", "wrong_payee"),
    ("mixed channel", "wrong_channel"), ("forged", "bad_signature"), ("not a batch", "bad_batch"),
])
def test_a_bad_batch_is_refused_naming_the_rule(payer, channel, fault, rule):
    rs = _chain(payer, channel, 4)
    payee = channel.payee
    if fault == "gap":
        del rs[2]
    elif fault == "reorder":
        rs[1], rs[2] = rs[2], rs[1]
    elif fault == "duplicate":
        rs.append(rs[-1])
    elif fault == "other payee":
        payee = b"\x09" * 32
    elif fault == "mixed channel":
        rs.append(_chain(payer, Channel.new(channel.payer, channel.payee, "USD"), 1)[0])
    elif fault == "forged":
        body = canonical.decode(rs[3])
        body["time"] += 1  # any change to a signed field
        rs[3] = canonical.encode(body)
    raw = receipts.encode_batch(payee, 1, [rs])
    if fault == "not a batch":
        raw = canonical.encode({"domain": "something else"})
    with pytest.raises(ReceiptError) as exc:
        receipts.verify_batch(raw)
    assert _rule(exc) == rule
    assert str(exc.value).startswith("batch refused")


def test_a_batch_may_start_at_an_anchor_above_seq_one(payer, channel):
    rs = _chain(payer, channel, 5)
    s = receipts.verify_batch(receipts.encode_batch(channel.payee, 1, [rs[2:]]))
    (c,) = s.channels
    assert (c.first_seq, c.latest_seq, c.from_cumulative, c.cumulative) == (3, 5, 3, 15)
