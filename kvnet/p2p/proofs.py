"""Fraud proofs on the network: what a node does with them (docs/audits.md, "Proofs on the DHT").

- Before a fetch: a refused manifest, or one signed by a publisher with a proven fraud, is never
  fetched (`RefusedError`); otherwise the node looks up `/kvf/<manifest id>`, and a record found there
  makes the fetch include the pieces the proof needs (blocks 0..j).
- After the fetch, before anything uses the artifact: the record is judged. A node that runs the
  producer's model (`Node.proof_verifier`, set by `kvnet generate` and kvnet-node) verifies the proof;
  if it holds, the manifest is refused (removed from the store, written to the refusal list, its
  publisher scored down: kvnet.refusals) and the fetch raises `RefusedError`; if the verification
  proves it false (rules `recompute`, `honest`), its author is scored down and the proof ignored. A
  node without the model, or in another profile, cannot judge: it changes nothing.
- Lookups skip offers of refused manifests and of publishers with a proven fraud; announcing purges a
  refused manifest from the store instead of announcing it, so it is served no more.
- Proofs this node's own audits produced (kvnet-node's BackgroundAuditor, `kvnet audit`, `kvnet
  generate`: files `<home>/proofs/*.kvproof`) are signed by the node key and put in the DHT.

Torch-free: the verifier is a callable the process that holds the model injects.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from kvnet import fraud
from kvnet.errors import KvnetError
from kvnet.manifest import SignedManifest
from kvnet.p2p import dht as kdht
from kvnet.p2p.fetcher import FetchError
from kvnet.refusals import Refusals
from kvnet.store import NotFoundError

if TYPE_CHECKING:
    from kvnet.p2p.node import Node

__all__ = ["MAX_PENDING_PROOFS", "PROOF_LOOKUP_TIMEOUT_S", "RefusedError", "Verifier", "act_on_own", "admissible",
           "after_fetch", "before_fetch", "judge", "needed_pieces", "publish_pending", "purge_if_refused", "put",
           "refuse"]

log = logging.getLogger("kvnet.p2p.proofs")
PROOF_LOOKUP_TIMEOUT_S = 10.0  # the most a fetch waits for the /kvf/ lookup before going on without it
MAX_PENDING_PROOFS = 256  # proof files of <home>/proofs a node signs and puts, per pass (the rest: next pass)

Verifier = Callable[[bytes], fraud.VerifiedProof]
"""Verify a proof (kvnet.fraud.verify_proof with this process's model and its store's pieces); called in
a worker thread; raises ProofError."""


class RefusedError(FetchError):
    """The artifact is refused: a fraud proof against it was verified (now or before), or its
    publisher has a proven fraud."""


def admissible(refusals: Refusals, sm: SignedManifest) -> bool:
    """May a lookup offer this manifest: not refused, and its publisher has no proven fraud."""
    return not refusals.is_refused(sm.id) and not refusals.publisher_refused(sm.manifest.publisher)


async def lookup(node: Node, mid: bytes) -> fraud.ProofRecord | None:
    """The `/kvf/` record against `mid`, if the DHT holds one (bounded by PROOF_LOOKUP_TIMEOUT_S)."""
    raw = None
    with trio.move_on_after(PROOF_LOOKUP_TIMEOUT_S):
        try:
            raw = await node.dht.get_value(kdht.proof_key(mid))
        except Exception as exc:  # noqa: BLE001 - no record reachable is the same as none
            log.debug("proof lookup for %s failed: %s", mid.hex()[:16], exc)
    if not raw:
        return None
    try:
        record = fraud.open_record(bytes(raw))
    except fraud.ProofError as exc:  # our own value store may hold what the validator would refuse now
        log.info("proof record for %s ignored: %s", mid.hex()[:16], exc)
        return None
    return record if record.manifest_id == mid else None


def needed_pieces(needed: list[int], record: fraud.ProofRecord | None) -> list[int]:
    """The pieces a fetch asks for: its own plus those the proof's verification reads (blocks 0..j)."""
    if record is None:
        return needed
    m = record.proof.signed.manifest
    return sorted(set(needed) | set(m.pieces_for_tokens(m.boundary(record.proof.block))))


async def before_fetch(node: Node, sm: SignedManifest) -> fraud.ProofRecord | None:
    """Refuse what is refused; else the proof record against `sm`, if any (judged by `after_fetch`).
    A process that cannot verify proofs (no model: `kvnet fetch`) does not look one up."""
    if not admissible(node.refusals, sm):
        raise RefusedError(f"artifact {sm.id.hex()[:16]} is refused: a fraud proof against it or its "
                           f"publisher {sm.manifest.publisher.hex()[:16]} was verified (kvnet.refusals)")
    return await lookup(node, sm.id) if node.proof_verifier is not None else None


async def after_fetch(node: Node, sm: SignedManifest, record: fraud.ProofRecord | None) -> None:
    """Judge the record found before the fetch; a proof that holds refuses the artifact (RefusedError)."""
    if record is not None and await judge(node, record) == "refused":
        raise RefusedError(f"artifact {sm.id.hex()[:16]} refused: block {record.proof.block} is not the KV of "
                           f"its tokens (fraud proof by {record.author.hex()[:16]}, verified here)")


async def judge(node: Node, record: fraud.ProofRecord) -> str:
    """Verify a received proof and act on it: "refused" (it holds), "false" (it was proven false: its
    author is scored down), "ignored" (its author's proofs were false before), "unjudged" (this node
    cannot verify it: no model, another model or profile, pieces missing)."""
    if node.refusals.author_ignored(record.author):
        return "ignored"
    if node.proof_verifier is None:
        log.warning("a fraud proof against %s exists, but this process runs no model to verify it: ignored",
                    record.manifest_id.hex()[:16])
        return "unjudged"
    try:
        await trio.to_thread.run_sync(node.proof_verifier, record.proof.raw)
    except fraud.ProofError as exc:
        if exc.rule in fraud.JUDGED_RULES:
            score = node.refusals.false_proof(record.author)
            log.warning("false fraud proof against %s by %s (%s): author scored down to %.1f",
                        record.manifest_id.hex()[:16], record.author.hex()[:16], exc, score)
            return "false"
        log.info("cannot judge the fraud proof against %s: %s", record.manifest_id.hex()[:16], exc)
        return "unjudged"
    await refuse(node, record.proof, record.author)
    return "refused"


def _drop(store, mid: bytes) -> None:
    with contextlib.suppress(NotFoundError):  # removed meanwhile (another process, an eviction)
        store.delete(mid, force=True)


async def refuse(node: Node, proof: fraud.FraudProof, author: bytes | None) -> None:
    """Remember the refusal (and score the publisher down), then drop the manifest from the store, so
    it is neither used, nor announced, nor served again."""
    m = proof.signed.manifest
    node.refusals.refuse(proof.manifest_id, m.publisher, proof.id, proof.block, author)
    await node.runner.call(_drop, node.store, proof.manifest_id)
    log.warning("artifact %s refused: block %d is not the KV of its tokens; publisher %s scored down",
                proof.manifest_id.hex()[:16], proof.block, m.publisher.hex()[:16])


async def purge_if_refused(node: Node, mid: bytes) -> bool:
    """Announcing a refused manifest (put back by another process, or refused by one): drop it instead."""
    if not node.refusals.is_refused(mid):
        return False
    await node.runner.call(_drop, node.store, mid)
    return True


async def put(node: Node, proof: bytes) -> bytes | None:
    """Sign `proof` by the node key and put the record under `/kvf/<manifest id>`; the record, or None
    if it exceeds the DHT's PROOF_RECORD_MAX_BYTES (such proofs travel as files only)."""
    record = fraud.sign_record(node.key, proof)
    mid = fraud.check_proof(proof).manifest_id
    if len(record) > kdht.PROOF_RECORD_MAX_BYTES:
        log.warning("fraud proof against %s is %d bytes, over the DHT record limit %d: not put",
                    mid.hex()[:16], len(record), kdht.PROOF_RECORD_MAX_BYTES)
        return None
    await node.dht.put_value(kdht.proof_key(mid), record)
    return record


async def act_on_own(node: Node, proof: bytes) -> bytes | None:
    """A proof this node's own audit built (it is the verification): refuse the artifact, put the
    record in the DHT. Returns the record put (None if too large for the DHT)."""
    await refuse(node, fraud.check_proof(proof), None)
    try:
        return await put(node, proof)
    except Exception as exc:  # noqa: BLE001 - the refusal stands; the next announcement puts it again
        log.info("putting the fraud proof failed: %s", exc)
        return None


async def publish_pending(node: Node) -> int:
    """Refuse and put each proof file of `node.proofs_dir` (at most MAX_PENDING_PROOFS a pass; called at
    every full announcement, so a record displaced in the DHT is put again); how many were put. A file
    that is not a valid proof is skipped for the rest of the run."""
    if node.proofs_dir is None or not Path(node.proofs_dir).is_dir():
        return 0
    done = 0
    for path in sorted(Path(node.proofs_dir).glob("*.kvproof"))[:MAX_PENDING_PROOFS]:
        if path.name in node.proofs_skipped:
            continue
        try:
            raw = path.read_bytes()
            await refuse(node, fraud.check_proof(raw), None)
            done += await put(node, raw) is not None
        except (OSError, KvnetError) as exc:  # not a proof: never tried again
            log.info("proof file %s skipped: %s", path, exc)
            node.proofs_skipped.add(path.name)
        except Exception as exc:  # noqa: BLE001 - a DHT failure: tried again on the next pass
            log.info("putting the fraud proof %s failed: %s", path, exc)
    return done
