"""Real node processes: a provider SIGKILLed mid-transfer, a fetcher SIGKILLed mid-transfer and resumed
(over libp2p by the CLI, and over a bulk connection in TLS and TCP mode)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from kvnet import identity
from kvnet.p2p.node import Node
from kvnet.p2p.scores import PeerScores
from kvnet.store import Store
from tests.artifacts import fake_artifact, provider_home, serve_process
from tests.p2p.conftest import found_by

ROOT = Path(__file__).parents[2]
MB = 48


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def _kvnet(*args) -> list[str]:
    return [sys.executable, "-m", "kvnet.cli", *args]


@pytest.fixture
def artifact():
    return fake_artifact(21, MB, kv_shape=(28, 8, 128))  # Qwen3-0.6B-shaped: 438 tokens


@pytest.fixture
def providers(tmp_path, artifact):
    sm, pieces = artifact
    p1, addr1 = serve_process(provider_home(tmp_path, "P1", sm, pieces))
    p2, addr2 = serve_process(provider_home(tmp_path, "P2", sm, pieces), addr1)
    yield (p1, addr1), (p2, addr2)
    for p in (p1, p2):
        if p.poll() is None:
            p.terminate()
            p.wait(10)


@pytest.mark.trio
async def test_provider_killed_mid_transfer(tmp_path, artifact, providers):
    sm, pieces = artifact
    (p1, addr1), (p2, addr2) = providers
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    client = Node(Ed25519PrivateKey.generate(), Store(tmp_path / "C" / "store"), bootstrap=[addr2],
                  scores_path=tmp_path / "C" / "scores.sqlite", timeout=3.0)
    killed_at = []

    def on_piece(done, total):
        if done == 8 and not killed_at:
            os.kill(p1.pid, signal.SIGKILL)
            killed_at.append(done)

    async with trio.open_nursery() as n:
        await n.start(client.run)
        found = await found_by(client, sm.id, {addr.rsplit("/", 1)[-1] for addr in (addr1, addr2)})
        # 2-piece requests and grants: p1 always has work left when it dies at the 8th stored piece (with
        # grants of a share of what is left, 24 pieces each, it had often delivered all of it by then)
        result = await client.fetch(found, sm.manifest.n_tokens, on_piece=on_piece, window=2, batch=2,
                                    bulk_batch=2)
        n.cancel_scope.cancel()
    assert killed_at and p1.wait(5) == -signal.SIGKILL
    assert client.store.missing_pieces(sm.id) == []
    assert client.store.check() == []
    p1_id = addr1.rsplit("/", 1)[1]
    assert result.providers[addr2.rsplit("/", 1)[1]]["pieces"] > 0
    assert result.providers[p1_id]["dropped"] is not None
    assert PeerScores(tmp_path / "C" / "scores.sqlite").get(p1_id) < 0


def _kill_after_10_pieces(args: list[str], home, mid: bytes, n_pieces: int, after: int = 10,
                          exact: bool = False) -> int:
    """Run a fetching process, SIGKILL it once it reported `after` stored pieces; check that what it
    left in the store verifies and is partial (exactly `after` pieces if the process holds every later
    piece, see tests/p2p/paused_fetch.py); return how many pieces it left."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen = 0
    for line in proc.stdout:
        if line.startswith("piece"):
            seen += 1
            if seen == after:
                proc.kill()
                break
    assert proc.wait(10) == -signal.SIGKILL, proc.stderr.read()
    with Store(home / "store") as store:
        assert store.check() == []
        had = len(store.present_pieces(mid))
    assert had == after if exact else after <= had < n_pieces
    return had


def test_fetcher_killed_mid_transfer_resumes(tmp_path, artifact, providers):
    sm, pieces = artifact
    _, (p2, addr2) = providers
    home = tmp_path / "F"
    identity.generate(home / "identity.key")
    args = _kvnet("fetch", "--home", str(home), "--bootstrap", addr2, "--manifest", sm.id.hex(), "--log-pieces")
    had = _kill_after_10_pieces(args, home, sm.id, len(pieces))

    done = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"already had {had}" in done.stdout
    assert f"fetched {len(pieces) - had} pieces" in done.stdout
    with Store(home / "store") as store:
        assert store.missing_pieces(sm.id) == []
        assert store.check() == []


FETCHER = r"""
import sys
from functools import partial
from pathlib import Path

import trio

from kvnet import identity
from kvnet.p2p.node import Node
from kvnet.store import Store
from tests.p2p.paused_fetch import pause_offers_after

home, boot, mid, mode = Path(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
if len(sys.argv) > 5:  # hold every piece after the first N until the gate file appears (never, here)
    pause_offers_after(int(sys.argv[5]), Path(sys.argv[6]))


def on_piece(done, total):
    print("piece", done, total, flush=True)


async def main():
    node = Node(identity.load(home / "identity.key"), Store(home / "store"), bootstrap=[boot], timeout=5.0)
    async with trio.open_nursery() as n:
        await n.start(partial(node.run, announce=False))
        found = await node.find_manifest(mid)
        r = await node.fetch(found, on_piece=on_piece, bulk=mode)
        print("done", r.fetched, r.already_had, sorted(set(r.paths.values())), flush=True)
        n.cancel_scope.cancel()

trio.run(main)
"""


@pytest.mark.parametrize("mode", ["tls", "tcp"])
def test_bulk_fetcher_killed_mid_transfer_resumes(tmp_path, artifact, providers, mode):
    """A process fetching over a bulk connection is SIGKILLed; what it stored verifies, and a new
    process fetches only the rest, over bulk again."""
    sm, pieces = artifact
    _, (p2, addr2) = providers
    home = tmp_path / "F"
    identity.generate(home / "identity.key")
    args = [sys.executable, "-c", FETCHER, str(home), addr2, sm.id.hex(), mode]
    # the process takes 10 pieces and holds the rest at the door: the kill lands mid-transfer every time
    had = _kill_after_10_pieces([*args, "10", str(tmp_path / "never")], home, sm.id, len(pieces), exact=True)

    done = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"done {len(pieces) - had} {had} ['bulk-{mode}']" in done.stdout
    with Store(home / "store") as store:
        assert store.missing_pieces(sm.id) == []
        assert store.check() == []


def test_cli_generate_fetches_the_prefix_from_the_network(tmp_path):
    """Three processes: bootstrap node B, publisher P, and `kvnet generate --bootstrap B` on C."""
    doc = tmp_path / "doc.txt"
    doc.write_text("kvnet lets agents reuse the KV cache of documents they share. " * 12)  # 744 tokens
    b_home, p_home, c_home = tmp_path / "B", tmp_path / "P", tmp_path / "C"
    for home in (b_home, p_home, c_home):
        identity.generate(home / "identity.key")
    pub = subprocess.run(_kvnet("publish", str(doc), "--model", "tiny", "--home", str(p_home)),
                         capture_output=True, text=True, env=_env())
    assert pub.returncode == 0, pub.stderr
    b, b_addr = serve_process(b_home)
    p, _ = serve_process(p_home, b_addr)
    try:
        prompt = tmp_path / "prompt.txt"
        prompt.write_text(doc.read_text() + "Question: what do agents reuse?\nAnswer:")
        gen = subprocess.run(_kvnet("generate", "--model", "tiny", "--prompt-file", str(prompt), "--home",
                                    str(c_home), "--bootstrap", b_addr, "--max-new-tokens", "8", "--no-baseline"),
                             capture_output=True, text=True, env=_env(), timeout=120)
        assert gen.returncode == 0, gen.stderr
        assert "network: fetched 744 tokens" in gen.stderr
        assert "cached_tokens 744" in gen.stderr
    finally:
        for proc in (b, p):
            proc.terminate()
            proc.wait(10)


def test_fetch_from_a_partial_host_stores_what_exists_and_fails_clearly(tmp_path):
    sm, pieces = fake_artifact(22, 8, kv_shape=(28, 8, 128))
    home = tmp_path / "P"
    identity.generate(home / "identity.key")
    with Store(home / "store") as store:  # this host holds only the first 3 pieces
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, list(enumerate(pieces[:3])))
    proc, addr = serve_process(home)
    try:
        f_home = tmp_path / "F"
        identity.generate(f_home / "identity.key")
        r = subprocess.run(_kvnet("fetch", "--home", str(f_home), "--bootstrap", addr, "--manifest", sm.id.hex()),
                           capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 1
        assert "fetch failed" in r.stderr and "could not be fetched" in r.stderr
        with Store(f_home / "store") as store:
            assert store.present_pieces(sm.id) == {0, 1, 2}  # kept, verified, ready to resume
            assert store.check() == []
    finally:
        proc.terminate()
        proc.wait(10)
