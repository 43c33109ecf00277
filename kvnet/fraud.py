"""Fraud proofs: evidence, checkable by anyone with the same model, that a signed artifact's block j is
not the KV of the tokens its publisher committed to.

    proof = canonical msgpack map {
        "domain": "kvnet/fraud-proof", "v": 1,
        "manifest": bin (the signed manifest bytes), "block": int j,
        "tokens": bin (u32 little-endian token ids of blocks 0..j),
        "recomputed": [bin 32, one per layer] (BLAKE3(K || V) of block j recomputed from blocks 0..j-1) }
    proof id = BLAKE3(proof bytes)

The spec, the rules and a test vector are in docs/audits.md and docs/vectors.json. `check_proof` runs
the torch-free rules (a DHT validator can call it); `verify_proof` adds the recomputation and needs the
producer's model and compute profile. Each rejection is a `ProofError` whose `rule` names the rule.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvnet import canonical, chain, identity
from kvnet.errors import KvnetError
from kvnet.hashing import b3
from kvnet.manifest import MAX_MANIFEST_BYTES, ManifestError, SignedManifest, parse

if TYPE_CHECKING:
    from kvnet.audit import BlockAudit
    from kvnet.engine import Engine
    from kvnet.refusals import Refusals
    from kvnet.store import Store

__all__ = ["FORMAT_VERSION", "JUDGED_RULES", "MAX_PROOF_BYTES", "MAX_RECORD_BYTES", "PROOF_DOMAIN", "RECORD_DOMAIN",
           "RECORD_RULES", "RECORD_SIG_DOMAIN", "RULES", "FraudProof", "ProofError", "ProofRecord", "VerifiedProof",
           "build_proof", "check_proof", "decode_tokens", "encode_tokens", "open_record", "pieces_reader", "refuse",
           "sign_record", "verify_proof", "verify_stored", "write_proof"]

PROOF_DOMAIN = "kvnet/fraud-proof"
FORMAT_VERSION = 1
MAX_PROOF_TOKENS = 1 << 22  # = the manifest's MAX_TOKENS
# The largest manifest, the largest token list (4 bytes a token) and 1 MiB for the rest (headers, hashes).
MAX_PROOF_BYTES = MAX_MANIFEST_BYTES + 4 * MAX_PROOF_TOKENS + (1 << 20)
FIELDS = frozenset({"domain", "v", "manifest", "block", "tokens", "recomputed"})
# Every rule a proof can fail, in the order they are checked (docs/audits.md, "Verifying a proof").
RULES = ("size", "encoding", "fields", "version", "manifest", "block", "tokens", "chain", "hashes",
         "model", "profile", "pieces", "recompute", "honest")

# The rules whose failure proves the proof false (its author lied or erred), as opposed to "this verifier
# cannot judge it" (another model or profile, pieces it lacks): only these cost the author (docs/audits.md).
JUDGED_RULES = frozenset({"recompute", "honest"})

# -- the signed record that carries a proof on the DHT (docs/audits.md, "The proof record") -------------
RECORD_DOMAIN = "kvnet/fraud-proof-record"
RECORD_SIG_DOMAIN = b"kvnet/fraud-proof-record/v1\x00"
RECORD_FIELDS = frozenset({"domain", "v", "author", "proof", "sig"})
MAX_RECORD_BYTES = MAX_PROOF_BYTES + 1024  # the largest proof plus the envelope (author, sig, field names)
# The envelope's rules, checked before the proof's own RULES (docs/audits.md, "The proof record").
RECORD_RULES = ("record_size", "record_encoding", "record_fields", "record_version", "record_sig")

ReadPiece = Callable[[int], bytes | bytearray]


class ProofError(KvnetError, ValueError):
    """A fraud proof was rejected; `rule` is the rule it broke (one of RULES)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"proof rejected ({rule}): {message}")
        self.rule = rule


def _need(cond: bool, rule: str, message: str) -> None:
    if not cond:
        raise ProofError(rule, message)


def encode_tokens(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def decode_tokens(raw: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


@dataclass(frozen=True)
class FraudProof:
    """A decoded proof whose torch-free rules passed (see `check_proof`)."""

    signed: SignedManifest
    block: int
    tokens: list[int]
    recomputed: tuple[bytes, ...]
    raw: bytes

    @property
    def id(self) -> bytes:
        return b3(self.raw)

    @property
    def manifest_id(self) -> bytes:
        return self.signed.id


@dataclass(frozen=True)
class VerifiedProof:
    """A proof that passed every rule: block `block` of `manifest_id` is not the KV of its tokens."""

    proof: FraudProof
    max_abs: float
    rel: float
    tolerance: float
    first_layer: int | None


def build_proof(sm: SignedManifest, audit: BlockAudit, tokens: list[int]) -> bytes:
    """The canonical bytes of a proof for a block that failed an audit in the producer's own profile."""
    if audit.passed or not audit.same_profile:
        raise ProofError("honest", f"block {audit.block} did not fail an audit in the producer's profile "
                                   f"(verdict {audit.verdict}, same profile: {audit.same_profile}): no proof")
    end = sm.manifest.boundary(audit.block)
    raw = canonical.encode({"domain": PROOF_DOMAIN, "v": FORMAT_VERSION, "manifest": sm.raw,
                            "block": audit.block, "tokens": encode_tokens(list(tokens[:end])),
                            "recomputed": list(audit.recomputed)})
    check_proof(raw)  # what we hand out must pass our own rules
    return raw


def check_proof(raw: bytes) -> FraudProof:
    """The rules that need no model: size, encoding, fields, version, the manifest's signature, the
    block index, the token count and the chain keys of the tokens, the hash list. Torch-free."""
    _need(len(raw) <= MAX_PROOF_BYTES, "size", f"{len(raw)} bytes, limit {MAX_PROOF_BYTES}")
    try:
        d = canonical.decode(raw, MAX_PROOF_BYTES)
    except canonical.CanonicalError as exc:
        raise ProofError("encoding", str(exc)) from exc
    _need(isinstance(d, dict) and set(d) == FIELDS, "fields",
          f"a proof is a map of exactly {sorted(FIELDS)}")
    types_ok = (isinstance(d["domain"], str) and _is_int(d["v"]) and isinstance(d["manifest"], bytes)
                and _is_int(d["block"]) and isinstance(d["tokens"], bytes) and isinstance(d["recomputed"], list))
    _need(types_ok, "fields", "field types: domain str, v int, manifest bin, block int, tokens bin, "
                              "recomputed array")
    _need(d["domain"] == PROOF_DOMAIN and d["v"] == FORMAT_VERSION, "version",
          f"domain {d['domain']!r} v {d['v']}: this verifier reads {PROOF_DOMAIN!r} v {FORMAT_VERSION}")
    try:
        sm = parse(d["manifest"], allow_expired=True)
    except ManifestError as exc:
        raise ProofError("manifest", str(exc)) from exc
    m, j = sm.manifest, d["block"]
    _need(0 <= j < len(m.chain), "block", f"block {j} out of range: the artifact has {len(m.chain)} blocks")
    end = m.boundary(j)
    _need(len(d["tokens"]) == 4 * end, "tokens",
          f"block {j} needs the {end} token ids of blocks 0..{j} ({4 * end} bytes), got {len(d['tokens'])} bytes")
    tokens = decode_tokens(d["tokens"])
    keys = [k.key for k in chain.chain_keys(m.model_id, tokens, m.block_size)]
    _need(keys == list(m.chain[: j + 1]), "chain",
          "the tokens' chain keys differ from the manifest's: the publisher did not commit to these tokens")
    hashes = d["recomputed"]
    _need(len(hashes) == m.kv_shape[0] and all(isinstance(h, bytes) and len(h) == 32 for h in hashes), "hashes",
          f"recomputed must hold {m.kv_shape[0]} 32-byte hashes (one per layer)")
    return FraudProof(sm, j, tokens, tuple(hashes), bytes(raw))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def verify_proof(raw: bytes, engine: Engine, read_piece: ReadPiece) -> VerifiedProof:
    """Every rule: `check_proof`, then the recomputation of the block from the manifest's own pieces
    (`read_piece(i)` returns piece i; each is verified against the manifest before use).

    Needs the producer's model and compute profile: only there is the recomputation bitwise
    reproducible (rules `model`, `profile`). A proof is accepted only if the recomputed block hashes
    to what the proof says (`recompute`) and differs from the artifact's block beyond the tolerance
    (`honest`: a proof against an honest block is false)."""
    from kvnet import audit  # torch: only this part of the module needs it

    proof = check_proof(raw)
    m = proof.signed.manifest
    _need(engine.model_id == m.model_id, "model",
          f"the artifact's model is {m.model_id.hex()[:16]}..., this engine runs {engine.model_id.hex()[:16]}...")
    _need(dict(engine.profile) == dict(m.profile), "profile",
          f"the producer's compute profile {dict(m.profile)} is not this verifier's {dict(engine.profile)}: "
          "the recomputation is bitwise reproducible only within one profile")
    try:
        redone, stored = audit.recompute_block(engine, m, proof.tokens, proof.block, read_piece)
    except KvnetError as exc:
        if isinstance(exc, ProofError):
            raise
        raise ProofError("pieces", f"cannot read blocks 0..{proof.block} of the artifact: {exc}") from exc
    _need(audit.layer_hashes(redone) == proof.recomputed, "recompute",
          f"block {proof.block} recomputed here hashes differently from the proof's hashes")
    result = audit.audit_block_from(engine, m, proof.block, redone, stored, 0.0)
    _need(not result.passed, "honest",
          f"block {proof.block} is the KV of its tokens (verdict {result.verdict}, rel {result.rel:.3g} <= "
          f"{result.tolerance:.3g}): the proof accuses an honest block")
    return VerifiedProof(proof, result.max_abs, result.rel, result.tolerance, result.first_layer)


def refuse(store: Store, engine: Engine, raw: bytes, refusals: Refusals | None = None) -> VerifiedProof:
    """Verify a proof received from anyone against the pieces `store` holds, then stop using and
    serving the manifest it accuses: it is removed from the store (pinned or not; a node announces
    only what its store holds) and, with `refusals`, remembered (its publisher scored down) so it is
    never fetched again. A proof that fails any rule changes nothing (ProofError): a false accusation
    costs the publisher nothing. (A node does this through kvnet.p2p.proofs, which also blames authors.)"""
    proof = check_proof(raw)
    mid = proof.manifest_id

    def read(i: int) -> bytes | bytearray:
        try:
            return store.read_piece(mid, i, verify=False)
        except KvnetError as exc:
            raise ProofError("pieces", f"the store lacks piece {i} of {mid.hex()[:16]}: {exc}") from exc

    verified = verify_proof(raw, engine, read)
    if refusals is not None:
        refusals.refuse(mid, proof.signed.manifest.publisher, proof.id, proof.block)
    store.delete(mid, force=True)
    return verified


@dataclass(frozen=True)
class ProofRecord:
    """A signed proof record whose envelope and model-free proof rules passed (see `open_record`)."""

    author: bytes  # the 32-byte Ed25519 public key that signed it: who pays for a false accusation
    proof: FraudProof
    raw: bytes

    @property
    def manifest_id(self) -> bytes:
        return self.proof.manifest_id


def _record_body(author: bytes, proof: bytes) -> bytes:
    return canonical.encode({"domain": RECORD_DOMAIN, "v": FORMAT_VERSION, "author": author, "proof": proof})


def sign_record(key, proof: bytes) -> bytes:
    """The DHT record of `proof`, signed by its author's node key (an Ed25519PrivateKey).

    The proof is self-verifying; the signature only names who accuses, so that a proof found false
    costs its author (scored down, its later proofs ignored), never the publisher it accuses."""
    check_proof(proof)
    author = identity.public_bytes(key)
    sig = key.sign(RECORD_SIG_DOMAIN + _record_body(author, proof))
    return canonical.encode({"domain": RECORD_DOMAIN, "v": FORMAT_VERSION, "author": author, "proof": proof,
                             "sig": sig})


def open_record(raw: bytes) -> ProofRecord:
    """Check a proof record: the envelope (RECORD_RULES, in order), then the proof's model-free rules
    (`check_proof`). Torch-free: the DHT validator runs it. Raises ProofError naming the rule."""
    _need(len(raw) <= MAX_RECORD_BYTES, "record_size", f"{len(raw)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        d = canonical.decode(raw, MAX_RECORD_BYTES)
    except canonical.CanonicalError as exc:
        raise ProofError("record_encoding", str(exc)) from exc
    _need(isinstance(d, dict) and set(d) == RECORD_FIELDS, "record_fields",
          f"a proof record is a map of exactly {sorted(RECORD_FIELDS)}")
    types_ok = (isinstance(d["domain"], str) and _is_int(d["v"]) and isinstance(d["author"], bytes)
                and len(d["author"]) == 32 and isinstance(d["proof"], bytes) and isinstance(d["sig"], bytes))
    _need(types_ok, "record_fields", "field types: domain str, v int, author bin 32, proof bin, sig bin")
    _need(d["domain"] == RECORD_DOMAIN and d["v"] == FORMAT_VERSION, "record_version",
          f"domain {d['domain']!r} v {d['v']}: this verifier reads {RECORD_DOMAIN!r} v {FORMAT_VERSION}")
    _need(identity.verify(d["author"], d["sig"], RECORD_SIG_DOMAIN + _record_body(d["author"], d["proof"])),
          "record_sig", "the signature does not verify against the author key")
    return ProofRecord(d["author"], check_proof(d["proof"]), bytes(raw))


def verify_stored(raw: bytes, engine: Engine, store_root: Path) -> VerifiedProof:
    """`verify_proof` against the pieces a store holds, read through its own read-only connection (safe
    from any thread: a node's store connection belongs to its store thread)."""
    from kvnet.store import Store

    proof = check_proof(raw)
    with Store(Path(store_root), read_only=True) as store:
        def read(i: int) -> bytes | bytearray:
            try:
                return store.read_piece(proof.manifest_id, i, verify=False)
            except KvnetError as exc:
                raise ProofError("pieces", f"the store lacks piece {i} of {proof.manifest_id.hex()[:16]}: "
                                           f"{exc}") from exc

        return verify_proof(raw, engine, read)


def write_proof(folder: Path, raw: bytes) -> Path:
    """Store a proof as `<folder>/<manifest id hex>.<block>.kvproof` (atomically), where the home's node
    finds it to sign and put in the DHT at every full announcement (kvnet.p2p.proofs)."""
    proof = check_proof(raw)
    path = Path(folder) / f"{proof.manifest_id.hex()}.{proof.block}.kvproof"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)
    return path


def pieces_reader(signed: SignedManifest, source: Path) -> tuple[ReadPiece, Callable[[], None]]:
    """A piece reader for `verify_proof` and a close function. `source` is a kvnet home (holding
    store/), a store directory (holding index.sqlite), or a directory of piece files each named by the
    lower-case hex BLAKE3 of its bytes."""
    from kvnet.store import NotFoundError, Store

    root = source / "store" if (source / "store" / "index.sqlite").is_file() else source
    if (root / "index.sqlite").is_file():
        store = Store(root, read_only=True)

        def from_store(i: int) -> bytearray:
            try:
                return store.read_piece(signed.id, i, verify=False)
            except NotFoundError as exc:
                raise ProofError("pieces", f"{root} lacks piece {i} of {signed.id.hex()[:16]}: {exc}") from exc

        return from_store, store.close

    def from_dir(i: int) -> bytes:
        path = source / signed.manifest.pieces[i].hex()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ProofError("pieces", f"cannot read piece {i} ({path}): {exc.strerror or exc}") from exc

    return from_dir, lambda: None
