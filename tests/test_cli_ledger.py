"""`kvnet ledger`, `kvnet ledger export` and `kvnet ledger verify` as a user runs them (real processes),
over ledgers written by kvnet.ledger. `verify` runs in a fresh process whose home is empty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, identity
from kvnet.ledger import Ledger
from kvnet.receipts import Line

ROOT = Path(__file__).resolve().parents[1]
M1, M2 = b"\x01" * 32, b"\x02" * 32


def kvnet(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVNET_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "kvnet.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvnet {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def paid_home(tmp_path) -> tuple[Path, bytes, bytes, bytes]:
    """A payee's home whose ledger holds receipts from two payers; returns (home, payee, payer1, payer2)."""
    home = tmp_path / "payee"
    identity.generate(home / "identity.key")
    payee_key = identity.load(home / "identity.key")
    payee = identity.public_bytes(payee_key)
    payers = [Ed25519PrivateKey.generate() for _ in range(2)]
    with Ledger(home / "ledger.sqlite", payee_key) as led:
        for n, key in enumerate(payers, start=1):
            with Ledger(tmp_path / f"payer{n}.sqlite", key) as p:
                ch = p.open_channel(payee, "USD")
                for _ in range(n * 2):
                    led.accept(p.pay(ch, [Line(M1, "hosting", 1 << 20, 100), Line(M2, "license", 1, 1500)]).raw,
                               payee)
        led.mark_debtor(identity.public_bytes(payers[1]), "USD", 10**9, "credit window exhausted")
    return home, payee, identity.public_bytes(payers[0]), identity.public_bytes(payers[1])


def test_ledger_shows_balances_as_tables_and_json(paid_home):
    home, payee, p1, p2 = paid_home
    doc = json.loads(kvnet(home, "ledger", "--json").stdout)
    assert {(r["peer"], r["role"], r["receipts"], r["amount"]) for r in doc["peers"]} == {
        (p1.hex(), "in", 2, 3200), (p2.hex(), "in", 4, 6400)}
    assert [r["debtor"] for r in sorted(doc["peers"], key=lambda r: r["amount"])] == [False, True]
    assert doc["publishers"] == [{"publisher": payee.hex(), "role": "in", "currency": "USD", "loads": 6,
                                  "amount": 9000}]
    assert {(r["kind"], r["units"], r["amount"]) for r in doc["manifests"]} == {
        ("hosting", 6 << 20, 600), ("license", 6, 9000)}
    assert doc["debtors"][0]["peer"] == p2.hex()
    table = kvnet(home, "ledger").stdout
    assert "per peer" in table and p1.hex()[:16] in table and "6,400" in table and "per manifest" in table


def test_an_empty_home_has_an_empty_ledger(tmp_path):
    doc = json.loads(kvnet(tmp_path, "ledger", "--json").stdout)
    assert doc == {"peers": [], "publishers": [], "manifests": [], "channels": [], "debtors": []}
    res = kvnet(tmp_path, "ledger", "export", str(tmp_path / "b.bin"), check=False)
    assert res.returncode == 1 and res.stderr.startswith("error: no ledger")


def test_export_then_verify_in_a_fresh_process_with_an_empty_home(paid_home, tmp_path):
    home, payee, p1, p2 = paid_home
    batch = tmp_path / "batch.kvb"
    res = kvnet(home, "ledger", "export", str(batch))
    assert "2 channels" in res.stdout
    # --home before the subcommand names the same home (KVNET_HOME points elsewhere here)
    before = kvnet(tmp_path / "nowhere", "ledger", "--home", str(home), "export", str(tmp_path / "b2.kvb"))
    assert "2 channels" in before.stdout
    # the same receipts (the batch's `created` time may differ between the two exports)
    second = canonical.decode((tmp_path / "b2.kvb").read_bytes())
    assert second["channels"] == canonical.decode(batch.read_bytes())["channels"]
    empty = tmp_path / "empty-home"
    empty.mkdir()
    got = json.loads(kvnet(empty, "ledger", "verify", str(batch), "--json").stdout)
    assert got["ok"] and got["payee"] == payee.hex()
    assert sorted((o["payer"], o["amount"]) for o in got["owed"]) == sorted([(p1.hex(), 3200), (p2.hex(), 6400)])
    assert list(empty.iterdir()) == []  # verifying wrote nothing: no key, no store, no ledger
    assert "batch ok: 2 channels" in kvnet(empty, "ledger", "verify", str(batch)).stdout
    wrong = kvnet(empty, "ledger", "verify", str(batch), "--payee", p1.hex(), check=False)
    assert wrong.returncode == 1 and "wrong_payee" in wrong.stderr


def test_verify_refuses_a_tampered_batch_naming_the_rule(paid_home, tmp_path):
    home, *_ = paid_home
    batch = tmp_path / "batch.kvb"
    kvnet(home, "ledger", "export", str(batch))
    doc = canonical.decode(batch.read_bytes())
    longest = max(doc["channels"], key=len)
    del longest[1]  # drop a receipt from the middle of the 4-receipt channel
    batch.write_bytes(canonical.encode(doc))
    res = kvnet(tmp_path, "ledger", "verify", str(batch), check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("error: batch refused (skipped_sequence)")
    assert "Traceback" not in res.stderr


def test_export_since_writes_only_recent_channels(paid_home, tmp_path):
    home, *_ = paid_home
    batch = tmp_path / "later.kvb"
    kvnet(home, "ledger", "export", "--since", str(2**40), str(batch))
    got = json.loads(kvnet(tmp_path, "ledger", "verify", str(batch), "--json").stdout)
    assert got["channels"] == [] and got["owed"] == []
