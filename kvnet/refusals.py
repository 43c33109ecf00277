"""Refused artifacts and blamed keys, remembered across restarts (one small SQLite file per home).

A verified fraud proof (kvnet.fraud) makes a node drop the accused manifest from its store. Deleting
is not enough: the next lookup would find the same manifest on the network again and fetch it again.
So a refusal is written here, and fetch, lookup, serve and announce consult it (kvnet.p2p.proofs).

Keys are scored here too, by their 32-byte Ed25519 public key (kvnet.p2p.scores scores *peers*, which
are not the publishers: a host serves other publishers' artifacts):

- a publisher with a proven fraud is skipped by lookups from then on (`publisher_refused`): the
  publisher signed KV that is not the KV of its tokens, so nothing else it signed is trusted either;
- the author of a proof this node verified and found false (rules `recompute`, `honest`) is scored
  down, and a node ignores proofs by authors below AUTHOR_IGNORED_BELOW without verifying them (a
  verification costs a block of prefill: a liar must not be able to make every node pay it again).

Every process on one home (kvnet-node, `kvnet generate`, `kvnet fetch`) opens the same file; every
question is one indexed query, so what one process refused the others see at their next question.
Storage layer: torch-free, no network.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AUTHOR_IGNORED_BELOW", "FALSE_PROOF_PENALTY", "FRAUD_PENALTY", "FILENAME", "KeyScore", "Refusal",
           "Refusals"]

FILENAME = "refusals.sqlite"  # in the kvnet home, next to store/
FRAUD_PENALTY = -100.0  # a proven fraud: the publisher's artifacts are skipped whatever its score
FALSE_PROOF_PENALTY = -10.0  # a proof found false in the producer's profile, where a check is bitwise
AUTHOR_IGNORED_BELOW = -5.0  # proofs by an author scored below this are ignored unverified (one false proof)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS refused(manifest_id BLOB PRIMARY KEY, publisher BLOB NOT NULL,
    proof_id BLOB NOT NULL, block INTEGER NOT NULL, author BLOB, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS keys(key BLOB PRIMARY KEY, score REAL NOT NULL, frauds INTEGER NOT NULL,
    false_proofs INTEGER NOT NULL, updated REAL NOT NULL);
"""


@dataclass(frozen=True)
class Refusal:
    manifest_id: bytes
    publisher: bytes
    proof_id: bytes  # BLAKE3 of the proof bytes that proved the fraud
    block: int
    author: bytes | None  # who signed the record that carried the proof (None: this node's own audit)
    at: float


@dataclass(frozen=True)
class KeyScore:
    key: bytes
    score: float
    frauds: int  # proven frauds as a publisher
    false_proofs: int  # proofs found false as an author


class Refusals:
    """The refusal list and key scores at `path` (None: in memory, for tests and fetch-only uses)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # auditor threads and the store thread share one connection
        self.db = sqlite3.connect(str(path) if path is not None else ":memory:", check_same_thread=False,
                                  isolation_level=None, timeout=30)
        self.db.executescript(_SCHEMA)

    # -- refused manifests ------------------------------------------------------------------------

    def refuse(self, manifest_id: bytes, publisher: bytes, proof_id: bytes, block: int,
               author: bytes | None = None) -> bool:
        """Remember a manifest proven fraudulent and score its publisher down; True if it was new.

        The publisher is scored once per refused manifest (a proof seen twice costs it once)."""
        with self._lock:
            cur = self.db.execute("INSERT OR IGNORE INTO refused VALUES (?,?,?,?,?,?)",
                                  (manifest_id, publisher, proof_id, block, author, time.time()))
            if cur.rowcount:
                self._add(publisher, FRAUD_PENALTY, frauds=1)
            return bool(cur.rowcount)

    def is_refused(self, manifest_id: bytes) -> bool:
        with self._lock:
            row = self.db.execute("SELECT 1 FROM refused WHERE manifest_id=?", (manifest_id,)).fetchone()
        return row is not None

    def refused(self) -> list[Refusal]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM refused ORDER BY at").fetchall()
        return [Refusal(*r) for r in rows]

    # -- keys -------------------------------------------------------------------------------------

    def _add(self, key: bytes, delta: float, *, frauds: int = 0, false_proofs: int = 0) -> None:
        row = self.db.execute("SELECT score, frauds, false_proofs FROM keys WHERE key=?", (key,)).fetchone()
        score, f, fp = row if row else (0.0, 0, 0)
        self.db.execute("INSERT OR REPLACE INTO keys VALUES (?,?,?,?,?)",
                        (key, score + delta, f + frauds, fp + false_proofs, time.time()))

    def false_proof(self, author: bytes) -> float:
        """Score down the author of a proof found false; its new score."""
        with self._lock:
            self._add(author, FALSE_PROOF_PENALTY, false_proofs=1)
        return self.score(author).score

    def score(self, key: bytes) -> KeyScore:
        with self._lock:
            row = self.db.execute("SELECT score, frauds, false_proofs FROM keys WHERE key=?", (key,)).fetchone()
        return KeyScore(key, *row) if row else KeyScore(key, 0.0, 0, 0)

    def publisher_refused(self, publisher: bytes) -> bool:
        """A publisher with a proven fraud: lookups skip everything it signed."""
        return self.score(publisher).frauds > 0

    def author_ignored(self, author: bytes) -> bool:
        """An author whose proofs were found false: its proofs are not verified again."""
        return self.score(author).score < AUTHOR_IGNORED_BELOW

    def close(self) -> None:
        self.db.close()
