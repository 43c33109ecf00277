"""Paid transfers between real processes (docs/payments.md): `kvnet serve --fee-per-mib` and `kvnet fetch`
agree on what was delivered and paid, and the payee's `kvnet ledger export` verifies with `kvnet ledger
verify` in a fresh process with an empty home; a payer SIGKILLed mid paid transfer, and separately a
payee, restart: no receipt is lost, none is counted twice, the transfer resumes, both ledgers agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvnet import identity
from kvnet.ledger import Ledger
from kvnet.receipts import hosting_cost
from kvnet.store import Store
from tests.artifacts import fake_artifact, provider_home

ROOT = Path(__file__).parents[2]
FEE = 40
MB = 48
TAKEN = 24  # pieces a fetcher takes before it is paused, in the SIGKILL tests
WINDOW_MIB = 8  # the payee's credit window in the SIGKILL tests: what it serves beyond what it was paid


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}


def _kvnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvnet.cli", *args]


def _serve(home: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`kvnet serve --fee-per-mib FEE` for `home`: the process and its address."""
    proc = subprocess.Popen(_kvnet("serve", "--home", str(home), "--fee-per-mib", str(FEE), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    first = proc.stdout.readline().split()
    if not first or first[0] != "listening":
        raise RuntimeError(f"kvnet serve did not start: {proc.stderr.read()}")
    return proc, first[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def artifact():
    return fake_artifact(91, MB, kv_shape=(28, 8, 128))


def _channels(home: Path, role: str) -> list[tuple]:
    with Ledger(home / "ledger.sqlite", read_only=True) as led:
        return led.db.execute("SELECT id, payer, payee, last_seq, cumulative FROM channels WHERE role=? AND "
                              "last_seq>0 ORDER BY id", (role,)).fetchall()


def _receipts(home: Path) -> list[tuple]:
    with Ledger(home / "ledger.sqlite", read_only=True) as led:
        return led.db.execute("SELECT id, channel, seq, cumulative FROM receipts ORDER BY channel, seq").fetchall()


def _hosting_bytes(home: Path) -> int:
    with Ledger(home / "ledger.sqlite", read_only=True) as led:
        return led.db.execute("SELECT COALESCE(SUM(units), 0) FROM lines WHERE kind='hosting'").fetchone()[0]


def _assert_agree(payer: Path, payee: Path) -> tuple:
    """Both ledgers hold the same receipts, each once, with sequences 1..n and no gap."""
    out, got = _channels(payer, "out"), _channels(payee, "in")
    assert out == got and len(out) == 1
    assert _receipts(payer) == _receipts(payee)
    seqs = [r[2] for r in _receipts(payee)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert _hosting_bytes(payer) == _hosting_bytes(payee)
    return out[0]


def test_two_processes_agree_and_the_export_verifies_in_a_fresh_process(tmp_path, artifact):
    sm, pieces = artifact
    host = provider_home(tmp_path, "H", sm, pieces)
    payer = tmp_path / "F"
    identity.generate(payer / "identity.key")
    proc, addr = _serve(host)
    try:
        over = subprocess.run(_kvnet("fetch", "--home", str(payer), "--bootstrap", addr, "--manifest", sm.id.hex(),
                                     "--max-per-mib", str(FEE - 1)), capture_output=True, text=True, env=_env(),
                              timeout=120)
        assert over.returncode == 1 and "spending limit per_mib" in over.stderr, over.stderr
        with Store(payer / "store") as store:
            assert store.present_pieces(sm.id) == set()  # refused before any byte moved
        r = subprocess.run(_kvnet("fetch", "--home", str(payer), "--bootstrap", addr, "--manifest", sm.id.hex(),
                                  "--max-per-mib", str(FEE), "--json"), capture_output=True, text=True, env=_env(),
                           timeout=120)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["fetched"] == len(pieces)
        views = {}
        for name, home in (("payer", payer), ("host", host)):  # read while the host still runs
            v = subprocess.run(_kvnet("ledger", "--home", str(home), "--json"), capture_output=True, text=True,
                               env=_env(), timeout=60)
            assert v.returncode == 0, v.stderr
            views[name] = json.loads(v.stdout)
    finally:
        _stop(proc)
    payer_key, host_key = (identity.public_bytes(identity.load(h / "identity.key")).hex() for h in (payer, host))
    out = [(p["peer"], p["amount"]) for p in views["payer"]["peers"] if p["role"] == "out"]
    got = [(p["peer"], p["amount"]) for p in views["host"]["peers"] if p["role"] == "in"]
    assert len(out) == len(got) == 1 and out[0][0] == host_key and got[0][0] == payer_key
    assert out[0][1] == got[0][1] >= hosting_cost(sm.manifest.total_bytes, FEE)
    assert summary["paid"] == {addr.rsplit("/", 1)[1]: got[0][1]}  # what `kvnet fetch --json` reports
    _assert_agree(payer, host)

    batch = tmp_path / "batch.kvs"
    e = subprocess.run(_kvnet("ledger", "export", "--home", str(host), str(batch)), capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert e.returncode == 0, e.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in _env(HOME=str(empty)).items() if k != "KVNET_HOME"}
    v = subprocess.run(_kvnet("ledger", "verify", str(batch), "--json"), capture_output=True, text=True, env=env,
                       cwd=empty, timeout=60)
    assert v.returncode == 0, v.stderr
    owed = json.loads(v.stdout)["owed"]
    assert owed == [{"payer": payer_key, "currency": "USD", "amount": got[0][1]}]
    assert list(empty.iterdir()) == []  # verifying wrote nothing


FETCHER = r"""
import sys
from functools import partial
from pathlib import Path

import trio

from kvnet.p2p import commands
from kvnet.p2p.fetcher import FetchError
from tests.p2p.paused_fetch import pause_offers_after

home, boot, mid = Path(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
if len(sys.argv) > 4:  # hold every piece after the first N until the gate file appears
    pause_offers_after(int(sys.argv[4]), Path(sys.argv[5]))


def on_piece(done, total):
    print("piece", done, total, flush=True)


async def main():
    node = commands.open_node(home, None, [boot], timeout=5.0)
    async with trio.open_nursery() as n:
        await n.start(partial(node.run, announce=False))
        try:
            r = await node.fetch(await node.find_manifest(mid), on_piece=on_piece)
            print("done", r.fetched, r.already_had, flush=True)
        except FetchError as exc:
            print("failed", exc, flush=True)
        n.cancel_scope.cancel()

trio.run(main)
"""


def _fetcher(tmp_path: Path, home: Path, addr: str, mid: bytes, *pause: str) -> subprocess.Popen:
    script = tmp_path / "fetcher.py"
    script.write_text(FETCHER)
    return subprocess.Popen([sys.executable, str(script), str(home), addr, mid.hex(), *pause],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _after_pieces(proc: subprocess.Popen, n: int) -> None:
    seen = 0
    for line in proc.stdout:
        if line.startswith("piece"):
            seen += 1
            if seen == n:
                return
    raise AssertionError(f"the fetcher stopped after {seen} pieces: {proc.stderr.read()}")


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


@pytest.mark.parametrize("who", ["payer", "payee"])
def test_a_process_killed_mid_paid_transfer_resumes_and_both_ledgers_agree(tmp_path, artifact, who):
    sm, pieces = artifact
    host = provider_home(tmp_path, "H", sm, pieces)
    payer = tmp_path / "F"
    identity.generate(payer / "identity.key")
    window = ("--credit-window", str(hosting_cost(WINDOW_MIB << 20, FEE)))
    proc, addr = _serve(host, *window)
    try:
        # The fetcher takes TAKEN pieces and holds the rest at the door until the gate opens (see
        # tests/p2p/paused_fetch.py). The payee grants only what keeps the payer within its credit
        # window: having granted TAKEN pieces it was paid for at least TAKEN - WINDOW_MIB of them (so it
        # holds receipts when the SIGKILL lands), and it has sent at most TAKEN + WINDOW_MIB < 48 pieces
        # (so a dead payee leaves the fetch short), whatever the grant sizes and timing.
        gate = tmp_path / "gate"
        f = _fetcher(tmp_path, payer, addr, sm.id, str(TAKEN), str(gate))
        _after_pieces(f, TAKEN)
        victim = f if who == "payer" else proc
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        if who == "payee":
            gate.touch()  # what the payee sent before it died still arrives; the rest never will
            assert "failed" in _finish(f)  # its only provider died: the fetch fails, what verified is kept
            proc, addr = _serve(host, *window)  # the host restarts on the same home (ledger, store)
        with Store(payer / "store") as store:
            assert store.check() == []
            had = len(store.present_pieces(sm.id))
        assert had == TAKEN if who == "payer" else TAKEN <= had <= TAKEN + WINDOW_MIB < len(pieces)
        paid_before = _channels(host, "in")
        assert _hosting_bytes(host) >= (TAKEN - WINDOW_MIB) << 20  # paid along the transfer, not only at the end
        out = _finish(_fetcher(tmp_path, payer, addr, sm.id))
        assert f"done {len(pieces) - had} {had}" in out  # it resumed: only the rest was fetched
    finally:
        _stop(proc)
    with Store(payer / "store") as store:
        assert store.missing_pieces(sm.id) == []
    _, _, _, seq, cumulative = _assert_agree(payer, host)
    assert paid_before and paid_before[0][3] <= seq  # nothing the payee had accepted was lost
    # every byte the payer verified and kept is paid, except what a killed payer had not paid yet
    # (at most the pieces it verified after its last receipt, bounded by the credit window)
    paid = _hosting_bytes(host)
    if who == "payee":
        assert paid >= sm.manifest.total_bytes
    else:
        assert sm.manifest.total_bytes - paid <= WINDOW_MIB << 20
    assert cumulative >= hosting_cost(paid, FEE)
