"""The store methods behind `kvnet rm`, `kvnet gc`, duplicate publishing, ambiguous id prefixes and
read-only homes, on real SQLite stores (no model except where publishing needs one)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet.publish import find_existing, publish_tokens
from kvnet.store import AmbiguousIdError, NotFoundError, PinnedError, Store
from tests.artifacts import _KEY, corrupt_piece, fake_artifact
from tests.conftest import random_tokens


def _put(store: Store, sm, pieces, which=None) -> None:
    store.put_manifest(sm.raw)
    idx = range(len(pieces)) if which is None else which
    store.put_pieces(sm.id, [(i, pieces[i]) for i in idx])


def _republished(sm, created: int, price: int = 0):
    """The same artifact re-signed by the same publisher later (what `publish --force` produces)."""
    m = dataclasses.replace(sm.manifest, created=created,
                            terms=dataclasses.replace(sm.manifest.terms, price_per_load=price))
    return m.sign(_KEY)


def test_delete_refuses_a_pinned_artifact_unless_forced(store):
    sm, pieces = fake_artifact(1, 2)
    _put(store, sm, pieces)
    store.pin(sm.id)
    with pytest.raises(PinnedError, match="pinned"):
        store.delete(sm.id)
    assert store.missing_pieces(sm.id) == []  # untouched
    store.delete(sm.id, force=True)
    assert store.entries() == []
    assert not store.files.path(sm.id).exists()  # its data file is freed
    with pytest.raises(NotFoundError):
        store.delete(sm.id)


def test_delete_leaves_another_artifact_of_the_same_pieces_whole(store):
    old, pieces = fake_artifact(2, 2)
    new = _republished(old, created=5)  # same pieces, different manifest (each has its own data file)
    _put(store, old, pieces)
    _put(store, new, pieces)
    store.delete(old.id)
    assert not store.files.path(old.id).exists() and store.files.path(new.id).exists()
    assert store.missing_pieces(new.id) == []
    assert [store.read_piece(new.id, i, verify=True) for i in range(len(pieces))] == pieces
    assert store.check() == []


def test_gc_removes_partial_and_superseded_and_keeps_newest_and_pinned(store):
    old, pieces = fake_artifact(3, 3)
    newer = _republished(old, created=10, price=5)
    # newer and incomplete (other piece bytes, none stored): it does not supersede `newer`
    alt, _ = fake_artifact(30, 3)
    newest_partial = dataclasses.replace(old.manifest, created=20, pieces=alt.manifest.pieces).sign(_KEY)
    other, other_pieces = fake_artifact(4, 2)
    pinned_partial, pp_pieces = fake_artifact(5, 3)
    _put(store, old, pieces)
    _put(store, newer, pieces)
    _put(store, newest_partial, pieces, which=[])  # manifest only
    _put(store, other, other_pieces)
    _put(store, pinned_partial, pp_pieces, which=[0])
    store.pin(pinned_partial.id)

    planned = store.gc(dry_run=True)
    assert {(i.id, i.reason) for i in planned} == {(old.id, "superseded"), (newest_partial.id, "partial")}
    assert next(i for i in planned if i.id == old.id).superseded_by == newer.id
    assert len(store.entries()) == 5  # dry run removed nothing

    removed = store.gc()
    assert {i.id for i in removed} == {old.id, newest_partial.id}
    assert {e.id for e in store.entries()} == {newer.id, other.id, pinned_partial.id}
    assert store.missing_pieces(newer.id) == []  # the survivor keeps its own pieces
    assert sorted(p.name for p in (store.root / "data").iterdir()) == sorted(
        store.files.path(m).name for m in (newer.id, other.id, pinned_partial.id))  # removed files freed
    assert store.check() == []
    assert store.gc() == []


def test_an_ambiguous_prefix_lists_its_candidates(store):
    ids = []
    for seed in range(17):  # 17 ids over 16 first hex digits: at least two share one
        sm, pieces = fake_artifact(100 + seed, 1)
        store.put_manifest(sm.raw)
        ids.append(sm.id.hex())
    first = next(h[0] for h in ids if sum(x[0] == h[0] for x in ids) > 1)
    with pytest.raises(AmbiguousIdError) as err:
        store.resolve_id(first)
    assert sorted(c.id.hex() for c in err.value.candidates) == sorted(h for h in ids if h[0] == first)
    assert all(c.title.startswith("fake ") for c in err.value.candidates)
    assert store.resolve_id(ids[0]).hex() == ids[0]


def test_read_only_open_reads_and_never_writes(tmp_path):
    sm, pieces = fake_artifact(6, 2)
    with Store(tmp_path / "store") as store:
        _put(store, sm, pieces)
        corrupt_piece(store, sm.id, 1)  # corrupt one piece on disk
    def files() -> dict:
        # SQLite may create the WAL's -wal/-shm side files for a reader in a writable directory; they
        # hold no data. Everything else must be byte-for-byte untouched.
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "store").rglob("*")
                if p.is_file() and not p.name.endswith(("-wal", "-shm"))}

    before = files()
    with Store(tmp_path / "store", read_only=True) as ro:
        assert [e.id for e in ro.entries()] == [sm.id]
        assert ro.resolve_id(sm.id.hex()[:10]) == sm.id
        bad = 0
        for i in range(len(pieces)):
            try:
                ro.read_piece(sm.id, i, verify=True)
            except Exception:  # noqa: BLE001 - the corrupt piece is reported
                bad += 1
        assert bad == 1
        assert len(ro.present_pieces(sm.id)) == 2  # reported, not dropped
    assert files() == before
    with pytest.raises(NotFoundError, match="no store"):
        Store(tmp_path / "nothing-here", read_only=True)


def test_find_existing_matches_same_key_model_tokens_and_block_size(tiny_bf16, tmp_path):
    tokens = random_tokens(300, seed=7)
    key = Ed25519PrivateKey.generate()
    with Store(tmp_path / "store") as store:
        assert find_existing(tiny_bf16, store, key, tokens) is None
        res = publish_tokens(tiny_bf16, store, key, tokens)
        assert find_existing(tiny_bf16, store, key, tokens).id == res.manifest_id
        assert find_existing(tiny_bf16, store, key, tokens, block_size=128) is None
        assert find_existing(tiny_bf16, store, key, tokens[:-1]) is None
        assert find_existing(tiny_bf16, store, key, tokens + [5]) is None
        assert find_existing(tiny_bf16, store, Ed25519PrivateKey.generate(), tokens) is None
