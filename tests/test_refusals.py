"""The refusal list and key scores (kvnet.refusals) on a real SQLite file: what a node refused stays
refused across a restart, a proven fraud blames the publisher once per manifest, a false proof blames
its author; and a node announcing a refused manifest purges it from its store instead."""

from __future__ import annotations

import pytest
import trio

from kvnet import refusals as rf
from kvnet.p2p import proofs
from kvnet.refusals import Refusals
from tests.artifacts import fake_artifact
from tests.p2p.conftest import make_node

MID, OTHER, PUB, AUTHOR = b"m" * 32, b"o" * 32, b"p" * 32, b"a" * 32


def test_refusals_survive_a_restart_and_blame_the_publisher_once(tmp_path):
    path = tmp_path / rf.FILENAME
    r = Refusals(path)
    assert not r.is_refused(MID) and not r.publisher_refused(PUB)
    assert r.refuse(MID, PUB, b"i" * 32, 2, AUTHOR)
    assert not r.refuse(MID, PUB, b"j" * 32, 3)  # the same manifest again: no second blame
    r.close()
    r = Refusals(path)  # another process, or after a restart
    assert r.is_refused(MID) and not r.is_refused(OTHER)
    (one,) = r.refused()
    assert (one.manifest_id, one.publisher, one.block, one.author) == (MID, PUB, 2, AUTHOR)
    assert r.score(PUB) == rf.KeyScore(PUB, rf.FRAUD_PENALTY, 1, 0)
    assert r.publisher_refused(PUB) and not r.author_ignored(AUTHOR)
    r.close()


def test_a_false_proof_costs_its_author(tmp_path):
    r = Refusals(tmp_path / rf.FILENAME)
    assert r.score(AUTHOR) == rf.KeyScore(AUTHOR, 0.0, 0, 0)
    assert r.false_proof(AUTHOR) == rf.FALSE_PROOF_PENALTY
    assert r.author_ignored(AUTHOR) and not r.publisher_refused(AUTHOR)
    assert r.score(AUTHOR).false_proofs == 1
    r.close()
    assert Refusals(tmp_path / rf.FILENAME).author_ignored(AUTHOR)


def test_lookups_skip_refused_manifests_and_fraudulent_publishers(tmp_path):
    sm, _ = fake_artifact(1, 1)
    sm2, _ = fake_artifact(2, 1)  # the same (test) publisher key
    r = Refusals(None)
    assert proofs.admissible(r, sm) and proofs.admissible(r, sm2)
    r.refuse(sm.id, sm.manifest.publisher, b"i" * 32, 0)
    assert not proofs.admissible(r, sm)
    assert not proofs.admissible(r, sm2)  # the same publisher: nothing else it signed is offered


@pytest.mark.trio
async def test_announcing_a_refused_manifest_purges_it_and_fetching_it_is_refused(tmp_path):
    """A refused manifest put back in the store (by another process on the home) is dropped instead of
    announced, so the node serves it no more; a fetch of it fails before any byte moves."""
    sm, pieces = fake_artifact(3, 1, piece_size=1 << 18)
    node = make_node(tmp_path, "N", refusals=Refusals(tmp_path / rf.FILENAME))
    node.store.put_manifest(sm.raw)
    node.store.put_pieces(sm.id, list(enumerate(pieces)))
    node.refusals.refuse(sm.id, sm.manifest.publisher, b"i" * 32, 1)
    assert await node.announce(sm.id) == 0
    assert [e.id for e in node.store.entries()] == []
    assert node.stats.provides == 0 and node.stats.values == 0
    from kvnet.p2p.node import Found

    with pytest.raises(proofs.RefusedError, match="is refused"):
        await node.fetch(Found(sm, sm.manifest.n_tokens, []))
    assert node.store.entries() == []
    await trio.sleep(0)


@pytest.mark.trio
async def test_a_node_signs_and_puts_the_proof_files_of_its_home(tmp_path, tiny_bf16, key):
    """`kvnet audit` and `kvnet generate` write proofs to <home>/proofs/ (they run no node); the home's
    node refuses the artifact and puts each proof, signed by its key, under /kvf/ when it announces."""
    from kvnet import audit, fraud, identity
    from kvnet.p2p import dht as kdht
    from tests.conftest import random_tokens
    from tests.poison import poisoned_artifact, put

    doc, other = random_tokens(2 * 64, seed=160), random_tokens(2 * 64, seed=161)
    sm, pieces = poisoned_artifact(tiny_bf16, key, doc, other, forged=1, block_size=64)
    raw = fraud.build_proof(sm, audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[1]).blocks[0], doc)
    folder = tmp_path / "N" / "proofs"
    folder.mkdir(parents=True)
    (folder / f"{sm.id.hex()}.1.kvproof").write_bytes(raw)
    (folder / "junk.kvproof").write_bytes(b"not a proof")
    node = make_node(tmp_path, "N", proofs_dir=folder)
    put(node.store, sm, pieces)
    async with trio.open_nursery() as n:
        await n.start(node.run)  # announces at start: the proof files first refuse, then go out
        assert node.refusals.is_refused(sm.id) and node.store.entries() == []
        with trio.fail_after(20):
            record = await node.dht.get_value(kdht.proof_key(sm.id))
        opened = fraud.open_record(record)
        assert opened.author == identity.public_bytes(node.key) and opened.proof.raw == raw
        assert node.proofs_skipped == {"junk.kvproof"}
        assert await proofs.publish_pending(node) == 1  # put again at every full announcement
        n.cancel_scope.cancel()


def test_the_library_refusal_remembers_and_a_false_proof_changes_nothing(tmp_path, tiny_bf16, key, store):
    """`kvnet.fraud.refuse(store, engine, raw, refusals)`: a proof that holds removes and remembers the
    manifest; a false one (an honest block accused) raises by rule and changes nothing."""
    from kvnet import audit, canonical, fraud
    from tests.conftest import random_tokens
    from tests.poison import poisoned_artifact, put

    doc, other = random_tokens(4 * 64, seed=162), random_tokens(4 * 64, seed=163)
    sm, pieces = poisoned_artifact(tiny_bf16, key, doc, other, forged=2, block_size=64)
    mid = put(store, sm, pieces)
    r = Refusals(tmp_path / rf.FILENAME)
    honest = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[1]).blocks[0]
    bad = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[2]).blocks[0]
    raw = fraud.build_proof(sm, bad, doc)
    false = canonical.encode({**canonical.decode(raw, fraud.MAX_PROOF_BYTES), "block": 1,
                              "tokens": fraud.encode_tokens(doc[: 2 * 64]), "recomputed": list(honest.recomputed)})
    with pytest.raises(fraud.ProofError, match=r"\(honest\)"):
        fraud.refuse(store, tiny_bf16, false, r)
    assert store.missing_pieces(mid) == [] and not r.is_refused(mid)
    assert fraud.refuse(store, tiny_bf16, raw, r).proof.block == 2
    assert store.entries() == [] and r.is_refused(mid) and r.publisher_refused(sm.manifest.publisher)
