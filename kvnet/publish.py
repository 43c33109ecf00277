"""Publish: tokens -> prefill -> artifact bytes -> signed manifest -> store."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import artifact, chain, identity
from kvnet.engine import Engine
from kvnet.manifest import MAX_PIECE_SIZE, SignedManifest, Terms
from kvnet.store import Store

STORE_BATCH = 16


@dataclass(frozen=True)
class PublishResult:
    signed: SignedManifest
    prefill_s: float
    total_s: float

    @property
    def manifest_id(self) -> bytes:
        return self.signed.id


def find_existing(engine: Engine, store: Store, key: Ed25519PrivateKey, tokens: list[int],
                  block_size: int = chain.DEFAULT_BLOCK_SIZE) -> SignedManifest | None:
    """This key's complete artifact of exactly `tokens` for this model and block size, if stored.

    Publishing it again would prefill for nothing and leave two manifests that differ only in their
    timestamps, so `kvnet publish` reuses this one unless told --force. An incomplete one does not
    count: a new publish replaces it (and `kvnet gc` later removes it as superseded)."""
    mid = store.find_published(engine.model_id, identity.public_bytes(key), tokens, block_size)
    return store.get_manifest(mid) if mid is not None else None


def publish_tokens(
    engine: Engine,
    store: Store,
    key: Ed25519PrivateKey,
    tokens: list[int],
    *,
    block_size: int = chain.DEFAULT_BLOCK_SIZE,
    piece_size: int = MAX_PIECE_SIZE,
    terms: Terms | None = None,
    source: dict | None = None,
    ttl_seconds: int = 0,
    on_layer: Callable[[int], None] | None = None,
    on_piece: Callable[[int, int], None] | None = None,
) -> PublishResult:
    """Prefill `tokens`, sign the artifact and store it (manifest first, then pieces)."""
    t0 = time.perf_counter()
    kv = engine.prefill(tokens, on_layer=on_layer)
    t1 = time.perf_counter()
    data = artifact.kv_to_bytes(kv, engine.layout, block_size)
    del kv
    signed = artifact.build_manifest(
        engine, tokens, data, key, block_size=block_size, piece_size=piece_size,
        terms=terms, source=source, ttl_seconds=ttl_seconds,
    )
    store.put_manifest(signed.raw)
    pieces = artifact.split_pieces(data, piece_size)
    for start in range(0, len(pieces), STORE_BATCH):  # group commits: one index transaction per batch
        batch = [(i, pieces[i]) for i in range(start, min(start + STORE_BATCH, len(pieces)))]
        _, errors = store.put_pieces(signed.id, batch)
        if errors:  # cannot happen unless memory is corrupt: we just hashed these bytes
            raise next(iter(errors.values()))
        if on_piece:
            on_piece(min(start + STORE_BATCH, len(pieces)), len(pieces))
    return PublishResult(signed, t1 - t0, time.perf_counter() - t0)
