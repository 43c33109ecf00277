"""Three real nodes: A audits a poisoned artifact it fetched from its publisher P and puts the fraud
proof in the DHT; C, which fetched the same artifact, finds the proof, verifies it (the recomputation of
the accused block, not an audit of its own choosing) and refuses the artifact. A false proof spreads
through the DHT as well (it is well formed) but changes nothing at C: nodes verify before they act."""

from __future__ import annotations

import pytest
import trio

from kvnet import audit, canonical, fraud
from kvnet.p2p import dht as kdht
from tests.conftest import random_tokens
from tests.p2p.conftest import make_node
from tests.poison import poisoned_artifact, put

B = 64


@pytest.mark.trio
async def test_a_proof_spreads_and_a_third_node_refuses_the_artifact(tmp_path, tiny_bf16):
    doc, other = random_tokens(4 * B, seed=140), random_tokens(4 * B, seed=141)
    p_node = make_node(tmp_path, "P")
    sm, pieces = poisoned_artifact(tiny_bf16, p_node.key, doc, other, forged=2, block_size=B)
    mid = put(p_node.store, sm, pieces)
    async with trio.open_nursery() as n:
        p = await n.start(p_node.run)
        a = await n.start(make_node(tmp_path, "A", [p.addrs[0]]).run)
        c = await n.start(make_node(tmp_path, "C", [p.addrs[0]]).run)
        for node in (a, c):
            found = await node.find_manifest(mid)
            assert found is not None
            await node.fetch(found)
            assert node.store.missing_pieces(mid) == []

        # A audits what it fetched and puts the proof under /kvf/<manifest id>
        report = audit.audit(tiny_bf16, sm, doc, lambda i: a.store.read_piece(mid, i), all_blocks=True)
        (bad,) = report.failed
        raw = fraud.build_proof(sm, bad, doc)
        assert len(raw) <= kdht.PROOF_RECORD_MAX_BYTES
        await a.dht.put_value(kdht.proof_key(mid), raw)

        # a false proof against the same manifest (block 1 is honest) passes the model-free DHT check
        honest = audit.audit(tiny_bf16, sm, doc, lambda i: a.store.read_piece(mid, i), blocks=[1]).blocks[0]
        d = canonical.decode(raw, fraud.MAX_PROOF_BYTES)
        false = canonical.encode({**d, "block": 1, "tokens": fraud.encode_tokens(doc[: 2 * B]),
                                  "recomputed": list(honest.recomputed)})
        kdht.ProofValidator().validate(kdht.proof_key(mid), false)
        with pytest.raises(fraud.ProofError, match=r"\(honest\)"):
            fraud.refuse(c.store, tiny_bf16, false)
        assert c.store.missing_pieces(mid) == []  # nothing changed at C

        # C finds the real proof in the DHT, verifies it, and stops using and serving the artifact
        with trio.fail_after(20):
            got = await c.dht.get_value(kdht.proof_key(mid))
        assert got == raw
        verified = fraud.refuse(c.store, tiny_bf16, got)
        assert verified.proof.block == 2 and verified.rel > verified.tolerance
        assert [e.id for e in c.store.entries()] == []
        n.cancel_scope.cancel()


def test_the_dht_refuses_malformed_or_misplaced_proofs(tiny_bf16, key):
    doc, other = random_tokens(4 * B, seed=142), random_tokens(4 * B, seed=143)
    sm, pieces = poisoned_artifact(tiny_bf16, key, doc, other, forged=1, block_size=B)
    bad = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[1]).blocks[0]
    raw = fraud.build_proof(sm, bad, doc)
    v = kdht.ProofValidator()
    v.validate(kdht.proof_key(sm.id), raw)
    tampered = canonical.decode(raw, fraud.MAX_PROOF_BYTES)
    tampered["tokens"] = fraud.encode_tokens([t ^ 1 for t in doc[: 2 * B]])
    for k, value, why in [
        (kdht.proof_key(bytes(32)), raw, "another manifest"),
        (kdht.proof_key(sm.id), canonical.encode(tampered), r"\(chain\)"),
        (kdht.proof_key(sm.id), b"\xc1", r"\(encoding\)"),
        (kdht.proof_key(sm.id), b"x", r"\(fields\)"),
        (kdht.proof_key(sm.id), b"y" * (kdht.PROOF_RECORD_MAX_BYTES + 1), "too large"),
        (kdht.manifest_key(sm.id), raw, "not a proof key"),
    ]:
        with pytest.raises(ValueError, match=why):
            v.validate(k, value)
    assert v.select(kdht.proof_key(sm.id), [raw + b"", raw[:10], raw]) == 1
