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

import bisect
import math
import threading
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

__all__ = ["ArtifactError", "KVBuilder", "Segment", "WrongModelError", "build_manifest", "check_compatible",
           "kv_to_bytes", "load_kv", "segments", "split_pieces", "verify_piece"]


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


class KVBuilder:
    """KV tensors filled from verified pieces as they come, in any order, from any thread.

    Why: a fetch verifies every piece as it arrives; building the KV from those bytes there and then
    spares reading the artifact back from the store after the fetch (from disk, since the fetch
    writes with O_DIRECT), which made a remote reuse ~2x a local one (docs/benchmarks.md). Loading
    from the store uses the same builder (`load_kv`), so both paths place bytes the same way.

    The caller verifies each piece before `add` (the builder trusts its bytes). Distinct pieces fill
    disjoint bytes, so threads may add different pieces at once; a piece added twice is ignored.
    Only the pieces covering the first `n_tokens` tokens are needed (`missing`); others are ignored.
    """

    def __init__(self, m: Manifest, engine: Engine, n_tokens: int | None = None) -> None:
        check_compatible(m, engine)
        n = m.n_tokens if n_tokens is None else n_tokens
        if not 0 < n <= m.n_tokens:
            raise ArtifactError(f"cannot load {n} tokens from an artifact of {m.n_tokens}")
        self.m, self.n_tokens = m, n
        lay = engine.layout
        dtype = DTYPES[lay.dtype]
        self.keys = [torch.empty(1, lay.kv_heads, n, lay.head_dim, dtype=dtype) for _ in range(lay.layers)]
        self.values = [torch.empty(1, lay.kv_heads, n, lay.head_dim, dtype=dtype) for _ in range(lay.layers)]
        self._segs = list(segments(lay, m.n_tokens, m.block_size, n))
        self._starts = [s.offset for s in self._segs]
        self._heads, self._row = lay.kv_heads, lay.head_dim * lay.itemsize  # a token's bytes in one head
        end = self._segs[-1].offset + self._segs[-1].length * self._heads * self._row
        self._needed = range(math.ceil(end / m.piece_size))
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        self._done: set[int] = set()

    def made_for(self, m: Manifest, n_tokens: int | None = None) -> bool:
        """Whether this builder is for the first `n_tokens` (default: all) of `m`."""
        return self.m == m and self.n_tokens == (m.n_tokens if n_tokens is None else n_tokens)

    def missing(self) -> list[int]:
        """The needed pieces not yet added (in order)."""
        with self._lock:
            return [i for i in self._needed if i not in self._done]

    def add(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Copy verified piece `index` into the tensors; the caller may reuse `data` once this returns."""
        if index not in self._needed:
            return
        if len(data) != self.m.piece_len(index):
            raise ArtifactError(f"piece {index}: {len(data)} bytes, the manifest says {self.m.piece_len(index)}")
        with self._lock:
            if index in self._claimed:
                return
            self._claimed.add(index)
        try:
            self._place(index, data)
        except BaseException:
            with self._lock:
                self._claimed.discard(index)
            raise
        with self._lock:
            self._done.add(index)

    def _place(self, index: int, data: bytes | bytearray | memoryview) -> None:
        lo = index * self.m.piece_size
        hi = lo + len(data)
        with warnings.catch_warnings():  # read-only source bytes are fine: we only ever read from them
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            src = torch.frombuffer(data, dtype=torch.uint8)
        k = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        while k < len(self._segs) and self._segs[k].offset < hi:
            seg = self._segs[k]
            a, b = max(lo, seg.offset), min(hi, seg.offset + seg.length * self._heads * self._row)
            if a < b:
                self._copy(seg, a - seg.offset, b - seg.offset, src[a - lo : b - lo])
            k += 1

    def _copy(self, seg: Segment, a: int, b: int, src: torch.Tensor) -> None:
        """Bytes [a, b) of segment `seg` (layout [kv_heads, length, head_dim]) into its tensor. Whole
        heads go in one copy; a head cut by a piece boundary is copied in parts, byte-exact."""
        take = min(seg.length, self.n_tokens - seg.start)  # the last block may be only partly needed
        dst = (self.keys if seg.kind == 0 else self.values)[seg.layer][0, :, seg.start : seg.start + take]
        dst = dst.view(torch.uint8)  # [kv_heads, take, head_dim * itemsize]
        head = seg.length * self._row  # one head's bytes in the segment
        h0, h1 = -(-a // head), b // head  # the heads the range holds whole
        if h0 < h1:
            whole = src[h0 * head - a : h1 * head - a].view(h1 - h0, seg.length, self._row)
            dst[h0:h1].copy_(whole[:, :take])
        for h in {a // head, (b - 1) // head} - set(range(h0, h1)):
            ra, rb = max(a, h * head) - h * head, min(b, (h + 1) * head) - h * head  # within head h
            rb = min(rb, take * self._row)
            if ra < rb:
                dst[h].view(-1)[ra:rb].copy_(src[h * head + ra - a : h * head + rb - a])

    def kv(self) -> KV:
        """The KV, once every needed piece is in (ArtifactError naming what is missing otherwise)."""
        missing = self.missing()
        if missing:
            raise ArtifactError(f"{len(missing)} of {len(self._needed)} pieces were never added (first: "
                                f"{missing[0]})")
        return KV(self.keys, self.values)


def load_kv(
    m: Manifest,
    engine: Engine,
    read_piece: Callable[[int], bytes | bytearray],
    n_tokens: int | None = None,
    builder: KVBuilder | None = None,
) -> KV:
    """Load the first `n_tokens` tokens (default: all) of an artifact into fresh cache tensors.

    Each piece is verified before any of its bytes are used; on any failure an ArtifactError is raised
    and no KV is returned. Only the pieces covering the needed blocks are read: with `builder` (made
    for `m`, holding the pieces a fetch verified), only those it still lacks.
    """
    if builder is None:
        builder = KVBuilder(m, engine, n_tokens)
    elif not builder.made_for(m, n_tokens):
        raise ValueError("the builder was made for another manifest or prefix length")
    for i in builder.missing():
        data = read_piece(i)
        verify_piece(m, i, data)
        builder.add(i, data)
    return builder.kv()
