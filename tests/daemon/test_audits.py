"""A real kvnet-node process audits what it loads, after answering: an honest artifact passes; a poisoned
one (block 2 of 4 computed from another text, honestly signed) is answered from (the audit never holds
the answer), then found out, refused (removed from the store, remembered in refusals.sqlite) and never
reused again. Results in `GET /v1/status` (`audits`) and the `kvnet_audits_total` counter."""

from __future__ import annotations

import time

import httpx

from kvnet import chain
from kvnet.refusals import FILENAME, Refusals
from kvnet.store import Store
from tests.artifacts import provider_home, serve_process
from tests.conftest import random_tokens
from tests.daemon.nodes import start, write_config
from tests.poison import honest_artifact, poisoned_artifact, put

B = 64


def _audited(c: httpx.Client, n: int, proofs: int = 0, deadline_s: float = 120.0) -> dict:
    """The status once `n` audits finished and `proofs` fraud proofs were acted on (the audit runs after
    the answer, on its own thread; a proof is counted once refused and put)."""
    deadline = time.monotonic() + deadline_s
    while True:
        audits = c.get("/v1/status").json()["audits"]
        done = audits["passed"] + audits["failed"] >= n and audits["proofs"] >= proofs
        if done or time.monotonic() > deadline:
            return audits
        time.sleep(0.2)


def _complete(c: httpx.Client, prompt: list[int]) -> dict:
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["kvnet"]


def test_the_node_audits_after_answering_and_refuses_a_poisoned_artifact(tmp_path, tiny_fp32, key):
    doc, other, plain = (random_tokens(4 * B, seed=s) for s in (150, 151, 152))
    poisoned, ppieces = poisoned_artifact(tiny_fp32, key, doc, other, forged=2, block_size=B)
    honest, hpieces = honest_artifact(tiny_fp32, key, plain, B)
    config = write_config(tmp_path / "n", extra="[audit]\nblocks = 8")  # every covered block
    with Store(tmp_path / "n" / "data" / "store") as store:
        put(store, poisoned, ppieces)
        put(store, honest, hpieces)
    node = start(config)
    try:
        with node.http() as c:
            first = _complete(c, plain + [5, 6])
            assert first["cached_tokens"] == 4 * B and first["audit"] == "queued"
            audits = _audited(c, 1)
            assert (audits["passed"], audits["failed"], audits["refused"]) == (1, 0, [])
            assert _complete(c, plain + [7])["audit"] == "audited before"

            answer = _complete(c, doc + [5, 6])  # answered from the poisoned KV: the audit comes after
            assert answer["cached_tokens"] == 4 * B and answer["audit"] == "queued"
            assert answer["manifest_id"] == poisoned.id.hex()
            audits = _audited(c, 2, proofs=1)
            assert (audits["passed"], audits["failed"], audits["proofs"]) == (1, 1, 1)
            assert audits["refused"] == [poisoned.id.hex()]
            (report, _) = audits["recent"]
            assert report["manifest_id"] == poisoned.id.hex() and not report["ok"]
            assert [b["block"] for b in report["blocks"] if b["verdict"] == "mismatch"] == [2]
            held = [a["manifest_id"] for a in c.get("/v1/kv").json()["artifacts"]]
            assert held == [honest.id.hex()]
            again = _complete(c, doc + [5, 6])
            assert again["cached_tokens"] == 0 and again["manifest_id"] is None
            metrics = httpx.get(f"http://{c.get('/v1/status').json()['metrics']}/metrics", timeout=10).text
        assert 'kvnet_audits_total{result="failed"} 1.0' in metrics
        assert 'kvnet_audits_total{result="passed"} 1.0' in metrics
    finally:
        assert node.stop() == 0
    assert Refusals(tmp_path / "n" / "data" / FILENAME).is_refused(poisoned.id)  # remembered
    (kept,) = (tmp_path / "n" / "data" / "proofs").iterdir()  # put again at every full announcement
    assert kept.name == f"{poisoned.id.hex()}.2.kvproof"


def test_audits_can_be_turned_off(tmp_path, tiny_fp32, key):
    plain = random_tokens(2 * B, seed=153)
    honest, hpieces = honest_artifact(tiny_fp32, key, plain, B)
    config = write_config(tmp_path / "n", extra="[audit]\nenabled = false")
    with Store(tmp_path / "n" / "data" / "store") as store:
        put(store, honest, hpieces)
    node = start(config)
    try:
        with node.http() as c:
            assert _complete(c, plain + [5])["audit"] == "off"
            audits = c.get("/v1/status").json()["audits"]
        assert audits["enabled"] is False and audits["queued"] == 0
    finally:
        assert node.stop() == 0


def test_a_proof_spreads_and_a_third_node_refuses_without_auditing(tmp_path, tiny_fp32, key):
    """P (`kvnet serve`, torch-free: it cannot judge, so it keeps serving) holds a poisoned artifact. B
    (kvnet-node) fetches it, answers, audits, refuses it and puts the signed proof record in the DHT.
    C (kvnet-node, audits off) then finds the artifact offered by P, finds the proof before using it,
    verifies it and refuses the artifact: it answers without reuse and never fetches it again."""
    n = chain.DEFAULT_BLOCK_SIZE  # what a node's prefix lookup computes chain keys with
    doc, other = random_tokens(4 * n, seed=154), random_tokens(4 * n, seed=155)
    sm, pieces = poisoned_artifact(tiny_fp32, key, doc, other, forged=2, block_size=n)
    proc, addr = serve_process(provider_home(tmp_path, "P", sm, pieces))
    try:
        b = start(write_config(tmp_path / "b", extra=f'bootstrap = ["{addr}"]\n[audit]\nblocks = 8'))
        try:
            with b.http() as cb:
                deadline = time.monotonic() + 60
                while cb.post("/v1/kv/lookup", json={"tokens": doc + [5]}).json()["network"] is None:
                    assert time.monotonic() < deadline, "P's artifact never became visible to B"
                    time.sleep(0.5)
                got = _complete(cb, doc + [5, 6])
                assert got["source"] == "network" and got["cached_tokens"] == 4 * n and got["audit"] == "queued"
                audits = _audited(cb, 1, proofs=1)
                assert (audits["failed"], audits["proofs"], audits["refused"]) == (1, 1, [sm.id.hex()])
        finally:
            assert b.stop() == 0
        c = start(write_config(tmp_path / "c", extra=f'bootstrap = ["{addr}"]\n[audit]\nenabled = false'))
        try:
            with c.http() as cc:
                deadline = time.monotonic() + 60
                while cc.post("/v1/kv/lookup", json={"tokens": doc + [5]}).json()["network"] is None:
                    assert time.monotonic() < deadline, "P's artifact never became visible to C"
                    time.sleep(0.5)
                got = _complete(cc, doc + [5, 6])
                status = cc.get("/v1/status").json()["audits"]
                held = cc.get("/v1/kv").json()["artifacts"]
                again = cc.post("/v1/kv/lookup", json={"tokens": doc + [5]}).json()
        finally:
            assert c.stop() == 0
    finally:
        proc.terminate()
        proc.wait(10)
    assert got["cached_tokens"] == 0 and "block 2 is not the KV of its tokens" in got["network_error"]
    assert status["queued"] == 0 and status["refused"] == [sm.id.hex()]  # C never audited
    assert held == [] and again["network"] is None  # P still offers it; C's lookups skip it
    (ref,) = Refusals(tmp_path / "c" / "data" / FILENAME).refused()
    assert ref.block == 2 and ref.author is not None  # signed by B
