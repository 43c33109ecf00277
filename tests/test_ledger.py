"""kvnet.ledger on real SQLite files: every refusal changes nothing, the payer survives SIGKILL without
reusing a sequence, debtors, the credit window, spending limits and settlement exports."""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, identity, receipts
from kvnet.ledger import Cost, Ledger, LedgerError, SpendingLimitError, SpendingLimits, credit_left
from kvnet.receipts import Channel, Line, ReceiptError

ROOT = Path(__file__).resolve().parents[1]
M1, M2 = b"\x01" * 32, b"\x02" * 32


def _host(amount: int, manifest: bytes = M1) -> list[Line]:
    return [Line(manifest, "hosting", 1 << 20, amount)]


@pytest.fixture
def keys() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
    return Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


@pytest.fixture
def pair(tmp_path, keys):
    """A payer's and a payee's ledger, and the payer's channel to the payee."""
    a, b = keys
    with Ledger(tmp_path / "payer.sqlite", a) as payer, Ledger(tmp_path / "payee.sqlite", b) as payee:
        yield payer, payee, payer.open_channel(identity.public_bytes(b), "USD")


def snapshot(ledger: Ledger) -> dict[str, list[tuple]]:
    """Every row of every table: a refused receipt must leave this unchanged."""
    tables = [r[0] for r in ledger.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    return {t: sorted(ledger.db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}


def test_accepted_receipts_are_stored_with_their_lines_and_usage(pair):
    payer, payee, ch = pair
    for amount in (5, 7):
        sr = payer.pay(ch, [*_host(amount), Line(M2, "license", 1, 100)])
        assert payee.accept(sr.raw, payee.me).id == sr.id
    latest = payee.latest(ch.id)
    assert (latest.role, latest.seq, latest.cumulative) == ("in", 2, 212)
    assert payer.latest(ch.id).cumulative == 212 and payer.latest(ch.id).role == "out"
    b = payee.balances()
    assert b["peers"] == [{"peer": payer.me.hex(), "role": "in", "currency": "USD", "channels": 1, "receipts": 2,
                           "amount": 212, "debtor": False}]
    assert {(m["manifest"][:2], m["kind"], m["units"], m["amount"]) for m in b["manifests"]} == {
        ("01", "hosting", 2 << 20, 12), ("02", "license", 2, 200)}
    assert b["publishers"] == [{"publisher": payee.me.hex(), "role": "in", "currency": "USD", "loads": 2,
                                "amount": 200}]


def _forge(key: Ed25519PrivateKey, ch: Channel, seq: int, cumulative: int, lines: list[Line]) -> bytes:
    return receipts.sign_receipt(key, ch, seq, cumulative, lines).raw


def test_every_refusal_names_its_rule_and_counts_nothing(pair, keys):
    payer, payee, ch = pair
    a, _ = keys
    first = payer.pay(ch, _host(10))
    second = payer.pay(ch, _host(5))
    payee.accept(first.raw, payee.me)
    payee.accept(second.raw, payee.me)
    stranger = Ed25519PrivateKey.generate()
    other_payee = Channel.new(payer.me, identity.public_bytes(Ed25519PrivateKey.generate()), "USD")
    other_channel = Channel.new(payer.me, payee.me, "USD")
    body = canonical.decode(_forge(a, ch, 3, 16, _host(1)))
    body["sig"] = stranger.sign(receipts.SIG_DOMAIN + canonical.encode({k: v for k, v in body.items() if k != "sig"}))
    value = canonical.decode(_forge(a, ch, 3, 16, _host(1)))
    cases = {
        "replayed": (second.raw, {}),
        "lower_cumulative": (_forge(a, ch, 3, 14, _host(0)), {}),
        "skipped_sequence": (_forge(a, ch, 4, 16, _host(1)), {}),
        "repeated_sequence": (_forge(a, ch, 2, 15, [*_host(4), *_host(1)]), {}),
        "wrong_payee": (_forge(a, other_payee, 1, 1, _host(1)), {}),
        "bad_signature": (canonical.encode(body), {}),
        "wrong_channel": (_forge(a, other_channel, 1, 1, _host(1)), {"expect_channel": ch.id}),
        "wrong_payer": (_forge(a, ch, 3, 16, _host(1)), {"expect_payer": identity.public_bytes(stranger)}),
        "wrong_currency": (_forge(a, ch, 3, 16, _host(1)), {"expect_currency": "EUR"}),
        "lines_do_not_add_up": (_forge(a, ch, 3, 17, _host(1)), {}),
        "malformed": (b"\x93\x01\x02\x03", {}),
        "non_canonical": (msgpack.packb(dict(reversed(list(value.items())))), {}),
        "oversized": (b"\x00" * (receipts.MAX_RECEIPT_BYTES + 1), {}),
    }
    before = snapshot(payee)
    for rule, (raw, kw) in cases.items():
        with pytest.raises(ReceiptError) as exc:
            payee.accept(raw, payee.me, **kw)
        assert exc.value.rule == rule, (rule, str(exc.value))
        assert snapshot(payee) == before, f"{rule}: the refused receipt changed the ledger"
    third = _forge(a, ch, 3, 16, _host(1))  # the honest next one is still accepted afterwards
    payee.accept(third, payee.me, expect_payer=payer.me, expect_channel=ch.id, expect_currency="USD")
    assert payee.latest(ch.id).cumulative == 16


def test_a_channel_starts_at_sequence_one(pair, keys):
    payer, payee, ch = pair
    payer.pay(ch, _host(1))
    second = payer.pay(ch, _host(1))
    with pytest.raises(ReceiptError) as exc:
        payee.accept(second.raw, payee.me)
    assert exc.value.rule == "skipped_sequence"
    for raw in payer.receipts_after(ch.id, payee.latest(ch.id).seq if payee.latest(ch.id) else 0):
        payee.accept(raw, payee.me)  # the payer resends what the payee lacks, in order
    assert payee.latest(ch.id).seq == 2


def test_pay_needs_the_key_and_a_ledger_belongs_to_one_key(tmp_path, keys):
    a, b = keys
    with Ledger(tmp_path / "l.sqlite", a) as led:
        ch = led.open_channel(identity.public_bytes(b), "USD")
        assert led.open_channel(identity.public_bytes(b), "USD") == ch  # one channel, reused
        assert led.open_channel(identity.public_bytes(b), "USD", via=b"host2") != ch
    with pytest.raises(LedgerError, match="ledger of key"):
        Ledger(tmp_path / "l.sqlite", b)
    with Ledger(tmp_path / "l.sqlite") as keyless, pytest.raises(LedgerError):
        keyless.pay(ch, _host(1))


# -- the payer killed in the middle of paying --------------------------------------------------------

PAYER_LOOP = r"""
import os, struct, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kvnet.ledger import Ledger
from kvnet.receipts import Line
key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sys.argv[1]))
payee, spool, limit = bytes.fromhex(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
led = Ledger(spool.parent / "payer.sqlite", key)
ch = led.open_channel(payee, "USD")
n = 0
with open(spool, "ab") as f:
    while limit < 0 or n < limit:
        sr = led.pay(ch, [Line(b"\x01" * 32, "hosting", 65536, 3)])  # durable before it is "sent"
        f.write(struct.pack(">I", len(sr.raw)) + sr.raw)  # "sending": append to the spool
        f.flush()
        n += 1
led.close()
"""


def _spooled(path: Path) -> list[bytes]:
    data, out, i = path.read_bytes(), [], 0
    while i + 4 <= len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        if i + 4 + n > len(data):
            break  # the kill cut the last write: that receipt was never fully "sent"
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _run_payer(tmp_path: Path, key_hex: str, payee: bytes, limit: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PAYER_LOOP, key_hex, payee.hex(), str(tmp_path / "spool"),
                             str(limit)], cwd=ROOT, stderr=subprocess.PIPE)


def test_a_payer_killed_while_paying_never_reuses_a_sequence(tmp_path, keys):
    a, b = keys
    payee_key = identity.public_bytes(b)
    from cryptography.hazmat.primitives import serialization

    key_hex = a.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption()).hex()
    for _round in range(2):  # kill it twice, mid-loop
        proc = _run_payer(tmp_path, key_hex, payee_key, -1)
        deadline = time.monotonic() + 60
        start = len(_spooled(tmp_path / "spool")) if (tmp_path / "spool").exists() else 0
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "spool").exists() and len(_spooled(tmp_path / "spool")) >= start + 25:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
    last = _run_payer(tmp_path, key_hex, payee_key, 10)
    _, err = last.communicate(timeout=60)
    assert last.returncode == 0, err.decode()

    sent = _spooled(tmp_path / "spool")
    seqs = [receipts.parse_receipt(r).receipt.seq for r in sent]
    assert len(set(seqs)) == len(seqs), "a sequence number was signed twice"
    with Ledger(tmp_path / "payer.sqlite", a) as payer, Ledger(tmp_path / "payee.sqlite", b) as payee:
        (ch_id,) = [r[0] for r in payer.db.execute("SELECT id FROM channels")]
        for raw in sent:  # the payee receives what was sent; a gap (recorded, killed before sending) is resent
            have = payee.latest(ch_id).seq if payee.latest(ch_id) else 0
            for missing in payer.receipts_after(ch_id, have):
                if receipts.parse_receipt(missing).receipt.seq >= receipts.parse_receipt(raw).receipt.seq:
                    break
                payee.accept(missing, payee_key)
            payee.accept(raw, payee_key)
        mine, theirs = payer.latest(ch_id), payee.latest(ch_id)
        assert (theirs.seq, theirs.cumulative) == (mine.seq, mine.cumulative)
        assert mine.cumulative == 3 * mine.seq  # nothing counted twice, nothing lost
        assert [r[0] for r in payer.db.execute("SELECT seq FROM receipts ORDER BY seq")] == list(
            range(1, mine.seq + 1))
        assert sorted(r[0] for r in payer.db.execute("SELECT raw FROM receipts")) == sorted(
            r[0] for r in payee.db.execute("SELECT raw FROM receipts"))
        assert len(sent) >= 60 and mine.seq >= len(sent)


PAYEE_LOOP = r"""
import struct, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kvnet.ledger import Ledger
from kvnet.receipts import ReceiptError
key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sys.argv[1]))
spool = Path(sys.argv[2])
led = Ledger(spool.parent / "payee.sqlite", key)
data, i = spool.read_bytes(), 0
while i < len(data):
    (n,) = struct.unpack(">I", data[i : i + 4])
    raw, i = data[i + 4 : i + 4 + n], i + 4 + n
    try:
        sr = led.accept(raw, led.me)
    except ReceiptError as exc:
        if exc.rule != "replayed":  # a restart sees its durable receipts again: nothing counted twice
            raise
        continue
    print(sr.receipt.seq, flush=True)  # the credit this receipt buys is used only after accept returned
led.close()
"""


def test_a_payee_killed_while_accepting_loses_no_acknowledged_receipt(tmp_path, keys):
    from cryptography.hazmat.primitives import serialization

    a, b = keys
    n = 400
    with Ledger(tmp_path / "payer.sqlite", a) as payer:
        ch = payer.open_channel(identity.public_bytes(b), "USD")
        sent = [payer.pay(ch, _host(3)).raw for _ in range(n)]
    (tmp_path / "spool").write_bytes(b"".join(struct.pack(">I", len(r)) + r for r in sent))
    key_hex = b.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption()).hex()
    cmd = [sys.executable, "-c", PAYEE_LOOP, key_hex, str(tmp_path / "spool")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = 0
    for line in proc.stdout:  # bounded: the loop ends after n receipts at most
        acked = int(line)
        if acked >= 50:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()
    assert 50 <= acked < n, "the payee finished before it could be killed"
    with Ledger(tmp_path / "payee.sqlite", b) as payee:
        assert payee.latest(ch.id).seq >= acked  # every receipt it acted on is on disk
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with Ledger(tmp_path / "payee.sqlite", b) as payee:
        latest = payee.latest(ch.id)
        assert (latest.seq, latest.cumulative) == (n, 3 * n)
        assert payee.db.execute("SELECT COUNT(*), SUM(added) FROM receipts").fetchone() == (n, 3 * n)


def test_a_committed_receipt_survives_closing_without_checkpoint(tmp_path, keys):
    """WAL + synchronous=FULL: a second connection (another process would do the same) sees it."""
    a, b = keys
    led = Ledger(tmp_path / "l.sqlite", a)
    ch = led.open_channel(identity.public_bytes(b), "USD")
    led.pay(ch, _host(9))
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    other = sqlite3.connect(tmp_path / "l.sqlite")
    assert other.execute("SELECT cumulative FROM channels").fetchone()[0] == 9
    other.close()
    led.close()


# -- credit window and debtors ---------------------------------------------------------------------------


def test_credit_window_and_debtors(pair):
    payer, payee, ch = pair
    window = 100
    assert credit_left(0, 0, window) == 100
    payee.accept(payer.pay(ch, _host(50)).raw, payee.me)
    assert payee.credit_left(payer.me, "USD", served=120, window=window) == 30
    assert payee.credit_left(payer.me, "USD", served=150, window=window) == 0
    assert not payee.is_debtor(payer.me)
    payee.mark_debtor(payer.me, "USD", owed=170, reason="credit window exhausted")
    assert payee.is_debtor(payer.me) and payee.debtors()[0]["owed"] == 170
    payee.accept(payer.pay(ch, _host(100)).raw, payee.me)  # 150 < 170: still a debtor
    assert payee.is_debtor(payer.me)
    payee.accept(payer.pay(ch, _host(20)).raw, payee.me)  # 170: paid up
    assert not payee.is_debtor(payer.me)
    assert payee.balances()["peers"][0]["debtor"] is False


# -- spending limits ------------------------------------------------------------------------------------


def test_spending_limits_name_the_limit(tmp_path, keys):
    a, b = keys
    host, other = identity.public_bytes(b), identity.public_bytes(Ed25519PrivateKey.generate())
    with Ledger(tmp_path / "l.sqlite", a) as led:
        now = time.time()
        led.pay(led.open_channel(host, "USD"), _host(600), when=int(now) - 10)
        led.pay(led.open_channel(host, "USD"), _host(10_000), when=int(now) - 2 * 86_400)  # older than a day
        led.pay(led.open_channel(other, "USD"), _host(300), when=int(now) - 10)
        limits = SpendingLimits("USD", per_load=2000, per_mib=50, per_peer_per_day=1000, total_per_day=1300)
        limits.check(led, host, Cost(400, "USD", price_per_load=2000, fee_per_mib=50), now=now)  # at the limits
        refusals = {
            "currency": (host, Cost(1, "EUR")),
            "per_load": (host, Cost(1, "USD", price_per_load=2001)),
            "per_mib": (host, Cost(1, "USD", fee_per_mib=51)),
            "per_peer_per_day": (host, Cost(401, "USD")),
            "total_per_day": (other, Cost(401, "USD")),
        }
        for name, (peer, cost) in refusals.items():
            with pytest.raises(SpendingLimitError) as exc:
                limits.check(led, peer, cost, now=now)
            assert exc.value.limit == name and name in str(exc.value)
        SpendingLimits().check(led, host, Cost(10**12, "USD"), now=now)  # no limits set: anything goes
        SpendingLimits("EUR").check(led, host, Cost(0, "USD"), now=now)  # free is never refused


# -- export ---------------------------------------------------------------------------------------------


def test_export_since_starts_each_channel_at_its_anchor(pair):
    payer, payee, ch = pair
    for i, t in enumerate((100, 200, 300, 400), start=1):
        payee.accept(payer.pay(ch, _host(i), when=t).raw, payee.me)
    full = receipts.verify_batch(payee.export())
    assert full.payee == payee.me and full.owed() == {(payer.me, "USD"): 10}
    (c,) = receipts.verify_batch(payee.export(since=300)).channels
    assert (c.first_seq, c.latest_seq, c.from_cumulative, c.cumulative) == (2, 4, 1, 10)
    assert receipts.verify_batch(payee.export(since=500)).channels == []
    assert receipts.verify_batch(payer.export()).channels == []  # the payer is paid on no channel


def test_a_host_holds_license_receipts_for_the_publisher_and_exports_them(tmp_path, keys):
    agent_key, publisher_key = keys
    publisher = identity.public_bytes(publisher_key)
    host_key = Ed25519PrivateKey.generate()
    with Ledger(tmp_path / "agent.sqlite", agent_key) as agent, \
            Ledger(tmp_path / "host.sqlite", host_key) as host, \
            Ledger(tmp_path / "pub.sqlite", publisher_key) as pub:
        ch = agent.open_channel(publisher, "USD", via=identity.public_bytes(host_key))
        for _ in range(3):
            sr = agent.pay(ch, [Line(M1, "license", 1, 1500)])
            host.accept(sr.raw, publisher)  # made out to the publisher: the host keeps it
        assert host.latest(ch.id).role == "held"
        with pytest.raises(ReceiptError) as exc:
            host.accept(agent.pay(ch, [Line(M1, "license", 1, 1500)]).raw, host.me)
        assert exc.value.rule == "wrong_payee"
        batch = host.export(role="held")
        s = receipts.verify_batch(batch, payee=publisher)
        assert s.payee is None and s.owed() == {(agent.me, "USD"): 4500}
        for raw in [bytes(x) for x in canonical.decode(batch)["channels"][0]]:
            pub.accept(raw, pub.me)  # the publisher collects them: the same bytes, now "in"
        assert pub.latest(ch.id).role == "in" and pub.latest(ch.id).cumulative == 4500


def test_a_read_only_ledger_reads_and_refuses_writes(tmp_path, keys):
    a, b = keys
    with Ledger(tmp_path / "l.sqlite", a) as led:
        led.pay(led.open_channel(identity.public_bytes(b), "USD"), _host(3))
    with Ledger(tmp_path / "l.sqlite", read_only=True) as ro:
        assert ro.me == identity.public_bytes(a)
        assert ro.balances()["peers"][0]["amount"] == 3
        with pytest.raises(LedgerError, match="read-only"):
            ro.mark_debtor(b"\x00" * 32, "USD", 1, "x")
    with pytest.raises(LedgerError):
        Ledger(tmp_path / "missing.sqlite", read_only=True)
