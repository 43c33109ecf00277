"""KV <-> artifact bytes <-> pieces.

Byte layout (docs/artifact.md): blocks in order; within block i, for each layer, K then V, each as
[kv_heads, tokens_in_block, head_dim] in the KV dtype, little-endian. A prefix of the document is
therefore a prefix of the artifact, and the first n blocks load from the first pieces alone.

Loading copies each verified piece's bytes straight into preallocated per-layer tensors: one copy of
the KV in total (the naive safetensors.load + DynamicCache path makes two).

The torch-free parts (piece splitting and verification, ArtifactError) live in `kvnet.pieces` and are
re-exported here.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import chain, identity
from kvnet.engine import DTYPES, KV, Engine, KVLayout
from kvnet.hashing import b3
from kvnet.manifest import MAX_PIECE_SIZE, Manifest, SignedManifest, Terms
from kvnet.pieces import ArtifactError, WrongModelError, split_pieces, verify_piece

__all__ = ["ArtifactError", "Segment", "WrongModelError", "build_manifest", "check_compatible", "kv_to_bytes",
           "load_kv", "segments", "split_pieces", "verify_piece"]


@dataclass(frozen=True)
class Segment:
    """One contiguous run of artifact bytes: layer `layer`'s K (kind 0) or V (kind 1) for a block."""

    offset: int
    layer: int
    kind: int
    start: int  # first token of the block
    length: int  # tokens in the block


def segments(layout: KVLayout, n_tokens: int, block_size: int, upto_tokens: int | None = None) -> Iterator[Segment]:
    """The artifact's segments in byte order, for the blocks covering the first `upto_tokens` tokens."""
    upto = n_tokens if upto_tokens is None else upto_tokens
    per_tok = layout.kv_heads * layout.head_dim * layout.itemsize
    offset = 0
    for start in range(0, min(math.ceil(upto / block_size) * block_size, n_tokens), block_size):
        length = min(block_size, n_tokens - start)
        for layer in range(layout.layers):
            for kind in (0, 1):
                yield Segment(offset, layer, kind, start, length)
                offset += length * per_tok


def kv_to_bytes(kv: KV, layout: KVLayout, block_size: int) -> memoryview:
    """Serialize KV into the block-major artifact layout (one copy of the KV bytes)."""
    n = kv.n_tokens
    buf = torch.empty(n * layout.bytes_per_token, dtype=torch.uint8)
    dtype = DTYPES[layout.dtype]
    for seg in segments(layout, n, block_size):
        src = (kv.keys if seg.kind == 0 else kv.values)[seg.layer][0, :, seg.start : seg.start + seg.length]
        size = src.numel() * layout.itemsize
        dst = buf[seg.offset : seg.offset + size].view(dtype).view(layout.kv_heads, seg.length, layout.head_dim)
        dst.copy_(src)
    return memoryview(buf.numpy()).cast("B")


def build_manifest(
    engine: Engine,
    tokens: list[int],
    data: memoryview,
    key: Ed25519PrivateKey,
    *,
    block_size: int = chain.DEFAULT_BLOCK_SIZE,
    piece_size: int = MAX_PIECE_SIZE,
    terms: Terms | None = None,
    source: dict | None = None,
    ttl_seconds: int = 0,
    now: int | None = None,
) -> SignedManifest:
    """Describe and sign an artifact. The same document, model and profile give the same piece hashes."""
    created = int(time.time()) if now is None else now
    lay = engine.layout
    m = Manifest(
        model_id=engine.model_id,
        profile=engine.profile,
        dtype=lay.dtype,
        kv_shape=(lay.layers, lay.kv_heads, lay.head_dim),
        n_tokens=len(tokens),
        block_size=block_size,
        chain=tuple(k.key for k in chain.chain_keys(engine.model_id, tokens, block_size)),
        piece_size=piece_size,
        pieces=tuple(b3(p) for p in split_pieces(data, piece_size)),
        total_bytes=len(data),
        publisher=identity.public_bytes(key),
        terms=terms or Terms(),
        created=created,
        expires=created + ttl_seconds if ttl_seconds else 0,
        source=source or {},
    )
    return m.sign(key)


def check_compatible(m: Manifest, engine: Engine) -> None:
    """Refuse KV that this engine cannot use exactly."""
    if m.model_id != engine.model_id:
        raise WrongModelError(
            f"artifact was computed by model {m.model_id.hex()[:16]}..., this engine runs "
            f"{engine.model_id.hex()[:16]}... ({engine.resolved.ref}, {engine.dtype}); refusing to load"
        )
    lay = engine.layout
    if (m.dtype, tuple(m.kv_shape)) != (lay.dtype, (lay.layers, lay.kv_heads, lay.head_dim)):
        raise WrongModelError(f"artifact KV {m.dtype} {m.kv_shape} does not fit the engine's {lay}")


def load_kv(
    m: Manifest,
    engine: Engine,
    read_piece: Callable[[int], bytes | bytearray],
    n_tokens: int | None = None,
) -> KV:
    """Load the first `n_tokens` tokens (default: all) of an artifact into fresh cache tensors.

    Each piece is verified before any of its bytes are used; on any failure an ArtifactError is raised
    and no KV is returned. Only the pieces covering the needed blocks are read.
    """
    check_compatible(m, engine)
    n = m.n_tokens if n_tokens is None else n_tokens
    if not 0 < n <= m.n_tokens:
        raise ArtifactError(f"cannot load {n} tokens from an artifact of {m.n_tokens}")
    lay = engine.layout
    dtype = DTYPES[lay.dtype]
    keys = [torch.empty(1, lay.kv_heads, n, lay.head_dim, dtype=dtype) for _ in range(lay.layers)]
    values = [torch.empty(1, lay.kv_heads, n, lay.head_dim, dtype=dtype) for _ in range(lay.layers)]
    per_tok = lay.kv_heads * lay.head_dim * lay.itemsize

    cur_index, cur = -1, b""

    def piece(i: int) -> bytes | bytearray:
        nonlocal cur_index, cur
        if i != cur_index:
            data = read_piece(i)
            verify_piece(m, i, data)
            cur_index, cur = i, data
        return cur

    for seg in segments(lay, m.n_tokens, m.block_size, n):
        size = seg.length * per_tok
        first, last = seg.offset // m.piece_size, (seg.offset + size - 1) // m.piece_size
        if first == last:
            off = seg.offset - first * m.piece_size
            raw: bytes | bytearray | memoryview = memoryview(piece(first))[off : off + size]
        else:  # a segment straddling piece boundaries: gather it (rare; pieces are large)
            parts = []
            for i in range(first, last + 1):
                lo = max(seg.offset, i * m.piece_size) - i * m.piece_size
                hi = min(seg.offset + size, (i + 1) * m.piece_size) - i * m.piece_size
                parts.append(bytes(memoryview(piece(i))[lo:hi]))
            raw = bytearray(b"".join(parts))
        with warnings.catch_warnings():  # read-only source bytes are fine: we only ever read from them
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            src = torch.frombuffer(raw, dtype=dtype).view(lay.kv_heads, seg.length, lay.head_dim)
        take = min(seg.length, n - seg.start)
        dst = (keys if seg.kind == 0 else values)[seg.layer][0, :, seg.start : seg.start + take]
        dst.copy_(src[:, :take])
    return KV(keys, values)
