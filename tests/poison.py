"""Poisoned artifacts for audit tests: block j computed from another text, the rest honest, the whole
honestly signed by its publisher (so every check short of an audit passes)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import artifact
from kvnet.engine import Engine
from kvnet.manifest import SignedManifest
from kvnet.store import Store


def poisoned_artifact(engine: Engine, key: Ed25519PrivateKey, doc: list[int], other: list[int], forged: int,
                      block_size: int, piece_size: int = 4096) -> tuple[SignedManifest, list[bytes]]:
    """An artifact of `doc` whose block `forged` holds the KV of `other`'s tokens at those positions.

    Blocks before it are one honest pass (as `kvnet publish` computes them); the forged block is
    prefilled from `other` on top of them; the blocks after it are prefilled from `doc` on top of the
    forged KV, so they are exactly what an auditor recomputes for them: only the forged block fails.
    The chain keys are `doc`'s: the publisher commits to the document it claims."""
    start, end = forged * block_size, min(len(doc), (forged + 1) * block_size)
    kv = engine.prefill(doc[:start]) if start else None
    kv = engine.prefill(other[start:end], kv=kv)
    if end < len(doc):
        kv = engine.prefill(doc[end:], kv=kv)
    data = artifact.kv_to_bytes(kv, engine.layout, block_size)
    sm = artifact.build_manifest(engine, doc, data, key, block_size=block_size, piece_size=piece_size,
                                 source={"title": f"poisoned at block {forged}"})
    return sm, [bytes(p) for p in artifact.split_pieces(data, piece_size)]


def honest_artifact(engine: Engine, key: Ed25519PrivateKey, doc: list[int], block_size: int,
                    piece_size: int = 4096) -> tuple[SignedManifest, list[bytes]]:
    """The artifact `kvnet publish` makes of `doc` (one prefill pass), as a manifest and pieces."""
    data = artifact.kv_to_bytes(engine.prefill(doc), engine.layout, block_size)
    sm = artifact.build_manifest(engine, doc, data, key, block_size=block_size, piece_size=piece_size)
    return sm, [bytes(p) for p in artifact.split_pieces(data, piece_size)]


def put(store: Store, sm: SignedManifest, pieces: list[bytes]) -> bytes:
    store.put_manifest(sm.raw)
    store.put_pieces(sm.id, list(enumerate(pieces)))
    return sm.id


def blockwise_artifact(engine: Engine, key: Ed25519PrivateKey, doc: list[int], block_size: int,
                       piece_size: int = 4096) -> tuple[SignedManifest, list[bytes]]:
    """`doc`'s artifact computed block by block (each block prefilled on top of the KV of the blocks
    before it): the computation an audit repeats, so every block audits bitwise (docs/audits.md)."""
    kv = None
    for start in range(0, len(doc), block_size):
        kv = engine.prefill(doc[start : start + block_size], kv=kv)
    data = artifact.kv_to_bytes(kv, engine.layout, block_size)
    sm = artifact.build_manifest(engine, doc, data, key, block_size=block_size, piece_size=piece_size)
    return sm, [bytes(p) for p in artifact.split_pieces(data, piece_size)]
