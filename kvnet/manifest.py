"""The signed manifest of a KV artifact, in canonical msgpack (specified in docs/artifact.md).

signed bytes = canonical({...body, "sig": Ed25519(DOMAIN || canonical(body))}); manifest id =
BLAKE3(signed bytes). `parse` checks, in this order: size, canonical encoding, field types, the
signature, then internal consistency and expiry. Nothing is trusted before all of it passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, identity
from kvnet.errors import KvnetError
from kvnet.hashing import b3

FORMAT_VERSION = 1
SIG_DOMAIN = b"kvnet/manifest/v1\x00"
MAX_PIECE_SIZE = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
MAX_TOKENS = 1 << 22
MAX_KV_DIM = 4096  # each of layers, kv heads, head dim
MAX_BLOCK_SIZE = 1 << 16
MAX_CURRENCY_BYTES = 16  # UTF-8 bytes, not characters: the same count in every language
TERMS_FIELDS = frozenset({"price_per_load", "currency"})
DTYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


class ManifestError(KvnetError, ValueError):
    """A manifest is malformed, inconsistent, expired or not signed by its publisher."""


@dataclass(frozen=True)
class Terms:
    """What a load of this KV costs, in integer micro-units of `currency`."""

    price_per_load: int = 0
    currency: str = "USD"


@dataclass(frozen=True)
class Manifest:
    model_id: bytes
    profile: dict[str, str]
    dtype: str
    kv_shape: tuple[int, int, int]  # layers, kv heads, head dim
    n_tokens: int
    block_size: int
    chain: tuple[bytes, ...]  # key at each block boundary, then the partial tail's key
    piece_size: int
    pieces: tuple[bytes, ...]
    total_bytes: int
    publisher: bytes
    terms: Terms
    created: int
    expires: int  # unix seconds; 0 means never
    source: dict[str, Any] = field(default_factory=dict)  # title, url, text_b3
    version: int = FORMAT_VERSION

    # -- derived ------------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        layers, heads, dim = self.kv_shape
        return layers * 2 * heads * dim * DTYPE_SIZES[self.dtype]

    def boundary(self, i: int) -> int:
        """Token count covered by chain key i."""
        return min((i + 1) * self.block_size, self.n_tokens)

    def bytes_for_tokens(self, n: int) -> int:
        """Artifact bytes needed to load the first n tokens: the whole blocks that cover them."""
        blocks = math.ceil(n / self.block_size)
        return min(blocks * self.block_size, self.n_tokens) * self.bytes_per_token

    def pieces_for_tokens(self, n: int) -> range:
        return range(math.ceil(self.bytes_for_tokens(n) / self.piece_size))

    def piece_len(self, i: int) -> int:
        return min(self.piece_size, self.total_bytes - i * self.piece_size)

    # -- encoding -----------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "model_id": self.model_id,
            "profile": dict(self.profile),
            "dtype": self.dtype,
            "kv_shape": list(self.kv_shape),
            "n_tokens": self.n_tokens,
            "block_size": self.block_size,
            "chain": list(self.chain),
            "piece_size": self.piece_size,
            "pieces": list(self.pieces),
            "total_bytes": self.total_bytes,
            "publisher": self.publisher,
            "terms": asdict(self.terms),
            "created": self.created,
            "expires": self.expires,
            "source": dict(self.source),
        }

    def sign(self, key: Ed25519PrivateKey) -> SignedManifest:
        if identity.public_bytes(key) != self.publisher:
            raise ManifestError("signing key does not match the manifest's publisher field")
        _validate(self)
        body = canonical.encode(self.body())
        sig = key.sign(SIG_DOMAIN + body)
        raw = canonical.encode({**self.body(), "sig": sig})
        return SignedManifest(self, raw, b3(raw))


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    raw: bytes  # the signed canonical bytes
    id: bytes  # BLAKE3(raw)


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "model_id": bytes, "profile": dict, "dtype": str, "kv_shape": list, "n_tokens": int,
    "block_size": int, "chain": list, "piece_size": int, "pieces": list, "total_bytes": int,
    "publisher": bytes, "terms": dict, "created": int, "expires": int, "source": dict, "sig": bytes,
}
_SOURCE_FIELDS = {"title": str, "url": str, "text_b3": bytes}
_SOURCE_SIZES = {"text_b3": 32}


def _is_int(v: Any) -> bool:
    """An integer that is not a bool (msgpack keeps them apart; Python does not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(msg)


def _validate(m: Manifest) -> None:
    """Internal consistency: every derived quantity must agree with what is declared."""
    _need(m.version == FORMAT_VERSION, f"field v: unsupported format version {m.version}")
    _need(len(m.model_id) == 32, "field model_id: must be 32 bytes")
    _need(len(m.publisher) == 32, "field publisher: must be a 32-byte Ed25519 public key")
    _need(m.dtype in DTYPE_SIZES, f"field dtype: unknown dtype {m.dtype!r}")
    _need(len(m.kv_shape) == 3 and all(_is_int(x) and 0 < x <= MAX_KV_DIM for x in m.kv_shape),
          f"field kv_shape: must be three ints [layers, kv_heads, head_dim], each in 1..{MAX_KV_DIM}")
    _need(0 < m.n_tokens <= MAX_TOKENS, f"field n_tokens: must be in 1..{MAX_TOKENS}")
    _need(0 < m.block_size <= MAX_BLOCK_SIZE, f"field block_size: must be in 1..{MAX_BLOCK_SIZE}")
    _need(0 < m.piece_size <= MAX_PIECE_SIZE, f"field piece_size: must be in 1..{MAX_PIECE_SIZE}")
    _need(m.total_bytes == m.n_tokens * m.bytes_per_token,
          f"field total_bytes: {m.total_bytes} != n_tokens x bytes per token "
          f"({m.n_tokens} x {m.bytes_per_token})")
    _need(len(m.chain) == math.ceil(m.n_tokens / m.block_size),
          f"field chain: {len(m.chain)} keys for {m.n_tokens} tokens in blocks of {m.block_size}")
    _need(all(isinstance(k, bytes) and len(k) == 32 for k in m.chain), "field chain: keys must be 32 bytes")
    _need(len(m.pieces) == math.ceil(m.total_bytes / m.piece_size),
          f"field pieces: {len(m.pieces)} hashes for {m.total_bytes} bytes in pieces of {m.piece_size}")
    _need(all(isinstance(h, bytes) and len(h) == 32 for h in m.pieces), "field pieces: hashes must be 32 bytes")
    _need(_is_int(m.terms.price_per_load) and m.terms.price_per_load >= 0,
          "field terms.price_per_load: must be an int >= 0")
    _need(isinstance(m.terms.currency, str) and 0 < len(m.terms.currency.encode()) <= MAX_CURRENCY_BYTES,
          f"field terms.currency: must be 1..{MAX_CURRENCY_BYTES} bytes of UTF-8")
    _need(m.created >= 0 and m.expires >= 0, "fields created/expires: must be >= 0")
    _need(m.expires == 0 or m.expires > m.created, "field expires: must be after created (or 0)")
    _need(all(isinstance(k, str) and isinstance(v, str) for k, v in m.profile.items()),
          "field profile: keys and values must be str")
    for k, v in m.source.items():
        _need(k in _SOURCE_FIELDS and isinstance(v, _SOURCE_FIELDS[k]), f"field source.{k}: not allowed")
        _need(k not in _SOURCE_SIZES or len(v) == _SOURCE_SIZES[k],
              f"field source.{k}: must be {_SOURCE_SIZES.get(k)} bytes")


def parse(raw: bytes, now: int | None = None, allow_expired: bool = False) -> SignedManifest:
    """Decode and fully verify signed manifest bytes. Raises ManifestError naming the failed field."""
    _need(len(raw) <= MAX_MANIFEST_BYTES, f"manifest is {len(raw)} bytes, limit {MAX_MANIFEST_BYTES}")
    try:
        d = canonical.decode(raw, MAX_MANIFEST_BYTES)
    except canonical.CanonicalError as exc:
        raise ManifestError(f"manifest encoding: {exc}") from exc
    _need(isinstance(d, dict), "manifest must be a map")
    missing = set(_FIELDS) - set(d)
    extra = set(d) - set(_FIELDS)
    _need(not missing, f"manifest lacks fields: {sorted(missing)}")
    _need(not extra, f"manifest has unknown fields: {sorted(extra)}")
    for name, typ in _FIELDS.items():
        ok = isinstance(d[name], typ) and not (typ is int and isinstance(d[name], bool))
        _need(ok, f"field {name}: expected {typ.__name__}, got {type(d[name]).__name__}")
    terms = d["terms"]
    _need(set(terms) == TERMS_FIELDS and _is_int(terms["price_per_load"]) and isinstance(terms["currency"], str),
          "field terms: exactly int price_per_load and str currency")
    m = Manifest(
        model_id=d["model_id"], profile=d["profile"], dtype=d["dtype"], kv_shape=tuple(d["kv_shape"]),
        n_tokens=d["n_tokens"], block_size=d["block_size"], chain=tuple(d["chain"]),
        piece_size=d["piece_size"], pieces=tuple(d["pieces"]), total_bytes=d["total_bytes"],
        publisher=d["publisher"], terms=Terms(**terms), created=d["created"], expires=d["expires"],
        source=d["source"], version=d["v"],
    )
    body = canonical.encode(m.body())
    _need(identity.verify(m.publisher, d["sig"], SIG_DOMAIN + body),
          "field sig: signature does not verify against the publisher key")
    _validate(m)
    now = int(time.time()) if now is None else now
    _need(allow_expired or m.expires == 0 or now < m.expires, f"manifest expired at {m.expires}")
    return SignedManifest(m, raw, b3(raw))
