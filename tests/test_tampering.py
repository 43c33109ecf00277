"""Every forgery or corruption is rejected with an error that names it, and nothing is loaded."""

import dataclasses

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import artifact, canonical
from kvnet.manifest import ManifestError, Terms, parse
from kvnet.store import Store
from tests.conftest import random_tokens

PIECE = 8192
DOC = random_tokens(300, seed=11)


@pytest.fixture
def published(tiny_bf16, key):
    data = artifact.kv_to_bytes(tiny_bf16.prefill(DOC), tiny_bf16.layout, 256)
    sm = artifact.build_manifest(tiny_bf16, DOC, data, key, piece_size=PIECE)
    pieces = [bytes(p) for p in artifact.split_pieces(data, PIECE)]
    assert len(pieces) > 3
    return sm, pieces


def _loader(pieces, index=None, change=None):
    def read(i):
        return change(pieces[i]) if i == index else pieces[i]
    return read


def test_untampered_loads(tiny_bf16, published):
    """Loading succeeds AND yields exactly what was published: a loader that returned well-shaped
    wrong tensors (zeros, blocks swapped, K for V) must not pass."""
    sm, pieces = published
    kv = artifact.load_kv(sm.manifest, tiny_bf16, _loader(pieces))
    assert kv.n_tokens == 300
    assert bytes(artifact.kv_to_bytes(kv, tiny_bf16.layout, 256)) == b"".join(pieces)
    own = tiny_bf16.prefill(DOC)
    for got, want in zip(kv.keys + kv.values, own.keys + own.values, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_flipped_bit_in_any_piece(tiny_bf16, published, which):
    sm, pieces = published
    idx = {"first": 0, "middle": len(pieces) // 2, "last": len(pieces) - 1}[which]

    def flip(p: bytes) -> bytes:
        b = bytearray(p)
        b[len(b) // 3] ^= 0x10
        return bytes(b)

    with pytest.raises(artifact.ArtifactError, match=f"piece {idx}: BLAKE3 mismatch"):
        artifact.load_kv(sm.manifest, tiny_bf16, _loader(pieces, idx, flip))


def test_truncated_piece(tiny_bf16, published):
    sm, pieces = published
    with pytest.raises(artifact.ArtifactError, match="piece 1: .* bytes, manifest says"):
        artifact.load_kv(sm.manifest, tiny_bf16, _loader(pieces, 1, lambda p: p[:-1]))


def test_tampered_piece_never_enters_the_store(tmp_path, published):
    sm, pieces = published
    with Store(tmp_path / "s") as store:
        store.put_manifest(sm.raw)
        with pytest.raises(artifact.ArtifactError, match="piece 2"):
            store.put_piece(sm.id, 2, b"\0" * len(pieces[2]))
        assert store.missing_pieces(sm.id) == list(range(len(pieces)))
        assert store.usage() == 0


def _resign_free_edit(raw: bytes, field: str, value) -> bytes:
    d = canonical.decode(raw)
    d[field] = value
    return canonical.encode(d)


@pytest.mark.parametrize("field,value", [
    ("n_tokens", 299), ("model_id", bytes(32)), ("dtype", "fp32"), ("block_size", 128),
    ("piece_size", 4096), ("created", 1), ("expires", 2**40), ("terms", {"price_per_load": 1, "currency": "USD"}),
    ("source", {"title": "forged"}), ("profile", {"device": "cpu"}), ("publisher", bytes(32)),
])
def test_altered_manifest_field(published, field, value):
    sm, _ = published
    with pytest.raises(ManifestError, match="sig"):
        parse(_resign_free_edit(sm.raw, field, value))


def test_altered_piece_hash_or_chain_key(published):
    sm, _ = published
    d = canonical.decode(sm.raw)
    d["pieces"][0] = bytes(32)
    with pytest.raises(ManifestError, match="sig"):
        parse(canonical.encode(d))
    d = canonical.decode(sm.raw)
    d["chain"][-1] = bytes(32)
    with pytest.raises(ManifestError, match="sig"):
        parse(canonical.encode(d))


def test_signature_by_another_key(published):
    sm, _ = published
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ManifestError, match="publisher"):
        sm.manifest.sign(other)  # we refuse to produce such a manifest
    d = canonical.decode(sm.raw)
    d["sig"] = other.sign(b"kvnet/manifest/v1\x00" + canonical.encode({k: v for k, v in d.items() if k != "sig"}))
    with pytest.raises(ManifestError, match="field sig"):
        parse(canonical.encode(d))


def test_consistent_looking_but_wrong_totals_are_refused(published, key):
    sm, _ = published
    bad = dataclasses.replace(sm.manifest, total_bytes=sm.manifest.total_bytes + 1)
    with pytest.raises(ManifestError, match="total_bytes"):
        bad.sign(key)


def test_malformed_and_expired_manifests(published, key):
    sm, _ = published
    with pytest.raises(ManifestError, match="encoding"):
        parse(sm.raw[:-3])
    with pytest.raises(ManifestError, match="unknown fields"):
        parse(_resign_free_edit(sm.raw, "extra", 1))
    expiring = dataclasses.replace(sm.manifest, created=100, expires=200, terms=Terms(5, "USD"))
    with pytest.raises(ManifestError, match="expired"):
        parse(expiring.sign(key).raw, now=300)
    assert parse(expiring.sign(key).raw, now=150).manifest.terms.price_per_load == 5
