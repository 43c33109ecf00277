"""Three real nodes. A fetches a poisoned artifact from its publisher P, audits it (the node policy's
BackgroundAuditor, real tiny-model forward passes), refuses it and puts the proof, signed by A's node
key, in the DHT. C, which never audits, looks up `/kvf/<id>` before using the artifact it fetches,
verifies the proof (the recomputation of the accused block) and refuses the artifact: removed, written
to its refusal list, never offered by a lookup nor fetched again, even after a restart. A false proof
(well formed, so it passes the DHT's model-free filter) costs its author, not the publisher."""

from __future__ import annotations

import pytest
import trio

from kvnet import audit, canonical, fraud, identity
from kvnet.p2p import dht as kdht
from kvnet.p2p import proofs
from kvnet.refusals import FILENAME, Refusals
from tests.conftest import random_tokens
from tests.p2p.conftest import make_node
from tests.poison import honest_artifact, poisoned_artifact, put

B = 64


def _verifying(node, engine, calls: list | None = None):
    """What `kvnet generate` and kvnet-node set: verify a proof with this process's model."""
    root = node.store.root

    def verify(raw: bytes):
        if calls is not None:
            calls.append(raw)
        return fraud.verify_stored(raw, engine, root)

    node.proof_verifier = verify
    return node


@pytest.mark.trio
async def test_a_proof_spreads_and_a_third_node_refuses_the_artifact(tmp_path, tiny_bf16):
    doc, other = random_tokens(4 * B, seed=140), random_tokens(4 * B, seed=141)
    p_node = make_node(tmp_path, "P")
    sm, pieces = poisoned_artifact(tiny_bf16, p_node.key, doc, other, forged=2, block_size=B)
    mid = put(p_node.store, sm, pieces)
    c_refusals = tmp_path / "C" / FILENAME
    async with trio.open_nursery() as n:
        p = await n.start(p_node.run)
        a = await n.start(_verifying(make_node(tmp_path, "A", [p.addrs[0]]), tiny_bf16).run)
        c = await n.start(_verifying(make_node(tmp_path, "C", [p.addrs[0]], refusals=Refusals(c_refusals)),
                                     tiny_bf16).run)
        found = await a.find_manifest(mid)
        assert found is not None
        await a.fetch(found)

        # A's policy: audit in the background on first load, every covered block here (3 random + last)
        made: list[bytes] = []
        auditor = audit.BackgroundAuditor(tiny_bf16, a.store.root, n_random=3, on_proof=made.append)
        assert auditor.loaded(mid, doc)
        assert await trio.to_thread.run_sync(auditor.drain, 120)
        auditor.close()
        (raw,) = made
        record = await proofs.act_on_own(a, raw)
        assert record is not None and len(record) <= kdht.PROOF_RECORD_MAX_BYTES
        assert fraud.open_record(record).author == identity.public_bytes(a.key)
        assert a.refusals.is_refused(mid) and a.store.entries() == []

        # C never audits: its fetch finds the proof, verifies it, refuses the artifact before any use
        found = await c.find_manifest(mid)
        assert found is not None and [o.peer for o in found.offers] == [p.peer_id.to_base58()]
        with pytest.raises(proofs.RefusedError, match="block 2 is not the KV of its tokens"):
            await c.fetch(found)
        assert c.store.entries() == []
        (ref,) = c.refusals.refused()
        assert (ref.manifest_id, ref.block, ref.author) == (mid, 2, identity.public_bytes(a.key))
        assert c.refusals.publisher_refused(sm.manifest.publisher)
        # refused from now on: lookups skip it (P still offers it), a fetch fails before any byte moves
        assert await c.find_manifest(mid) is None
        with pytest.raises(proofs.RefusedError, match="is refused"):
            await c.fetch(found)
        assert c.store.entries() == []
        n.cancel_scope.cancel()
    assert Refusals(c_refusals).is_refused(mid)  # survives C's restart


@pytest.mark.trio
async def test_a_false_proof_costs_its_author_not_the_publisher(tmp_path, tiny_bf16):
    doc = random_tokens(4 * B, seed=144)
    p_node = make_node(tmp_path, "P")
    sm, pieces = honest_artifact(tiny_bf16, p_node.key, doc, B)
    mid = put(p_node.store, sm, pieces)
    calls: list[bytes] = []
    async with trio.open_nursery() as n:
        p = await n.start(p_node.run)
        liar = await n.start(make_node(tmp_path, "L", [p.addrs[0]]).run)
        c = await n.start(_verifying(make_node(tmp_path, "C", [p.addrs[0]]), tiny_bf16, calls).run)
        # L accuses honest block 1 with the hashes of its own (honest) recomputation: well formed
        honest = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[1]).blocks[0]
        false = canonical.encode({"domain": fraud.PROOF_DOMAIN, "v": fraud.FORMAT_VERSION, "manifest": sm.raw,
                                  "block": 1, "tokens": fraud.encode_tokens(doc[: 2 * B]),
                                  "recomputed": list(honest.recomputed)})
        assert await proofs.put(liar, false) is not None  # the DHT filter lets it through

        found = await c.find_manifest(mid)
        await c.fetch(found)  # the proof is judged false: the artifact is kept and used
        assert c.store.missing_pieces(mid) == [] and not c.refusals.is_refused(mid)
        assert len(calls) == 1
        liar_key = identity.public_bytes(liar.key)
        assert c.refusals.score(liar_key).false_proofs == 1 and c.refusals.author_ignored(liar_key)
        assert not c.refusals.publisher_refused(sm.manifest.publisher)
        # the liar's proofs are not verified again (a verification costs a block of prefill)
        c.store.delete(mid, force=True)
        await c.fetch(await c.find_manifest(mid))
        assert len(calls) == 1 and c.store.missing_pieces(mid) == []
        n.cancel_scope.cancel()


def test_the_dht_refuses_malformed_or_misplaced_proof_records(tiny_bf16, key):
    doc, other = random_tokens(4 * B, seed=142), random_tokens(4 * B, seed=143)
    sm, pieces = poisoned_artifact(tiny_bf16, key, doc, other, forged=1, block_size=B)
    bad = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[1]).blocks[0]
    raw = fraud.build_proof(sm, bad, doc)
    rec = fraud.sign_record(key, raw)
    v = kdht.ProofValidator()
    v.validate(kdht.proof_key(sm.id), rec)
    tampered = canonical.decode(raw, fraud.MAX_PROOF_BYTES)
    tampered["tokens"] = fraud.encode_tokens([t ^ 1 for t in doc[: 2 * B]])
    envelope = canonical.decode(rec, fraud.MAX_RECORD_BYTES)
    for k, value, why in [
        (kdht.proof_key(bytes(32)), rec, "another manifest"),
        (kdht.proof_key(sm.id), raw, r"\(record_fields\)"),  # an unsigned proof
        (kdht.proof_key(sm.id), canonical.encode({**envelope, "proof": canonical.encode(tampered)}),
         r"\(record_sig\)"),
        (kdht.proof_key(sm.id), canonical.encode({**envelope, "sig": bytes(64)}), r"\(record_sig\)"),
        (kdht.proof_key(sm.id), b"\xc1", r"\(record_encoding\)"),
        (kdht.proof_key(sm.id), b"y" * (kdht.PROOF_RECORD_MAX_BYTES + 1), "too large"),
        (kdht.manifest_key(sm.id), rec, "not a proof key"),
    ]:
        with pytest.raises(ValueError, match=why):
            v.validate(k, value)
    # a record around a malformed proof, properly signed, is refused by the proof's own rule
    with pytest.raises(fraud.ProofError, match=r"\(chain\)"):
        fraud.sign_record(key, canonical.encode(tampered))
    assert v.select(kdht.proof_key(sm.id), [rec + b"", rec[:10], rec]) == 1
