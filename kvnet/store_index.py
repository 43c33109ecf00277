"""The store's index: one SQLite file (index.sqlite) saying which manifests the store holds and which of
their pieces are present, with chain keys for lookup, last use for LRU and pins.

A piece is present when its row is in `present`; `Store` inserts that row only after the piece's bytes
were verified and made durable in its data file (kvnet.store_files), one transaction per group. The
index is the truth: bytes in a data file that the index does not mark are never served.

SQLite runs in WAL mode with a busy timeout and `synchronous=FULL`, so several processes can read while
one writes and a committed group survives power loss. This module is SQL only: no files, no hashing.
Failures are sqlite3.Error; `Store` turns them into StoreError.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from kvnet.manifest import SignedManifest


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One `BEGIN IMMEDIATE` transaction on `db` (autocommit mode): the write lock is taken at the
    start, so writers in several processes queue instead of failing at commit; committed on success,
    rolled back on any exception (KeyboardInterrupt and cancellation included). Shared by the store
    index and the ledger."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


LAYOUT_VERSION = 2  # PRAGMA user_version: 2 = data files + `present`; 0/1 = pieces/<ab>/<hash> + `pieces`

# The tables layout 2 shares with layout 1 (manifests, their chain keys and piece lists), unchanged.
COMMON_TABLES = """
CREATE TABLE IF NOT EXISTS manifests(
    id BLOB PRIMARY KEY, model_id BLOB NOT NULL, n_tokens INTEGER NOT NULL, block_size INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL, n_pieces INTEGER NOT NULL, title TEXT, publisher BLOB NOT NULL,
    created INTEGER NOT NULL, expires INTEGER NOT NULL, added REAL NOT NULL, last_used REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS manifests_model ON manifests(model_id);
CREATE TABLE IF NOT EXISTS chain(
    key BLOB NOT NULL, manifest_id BLOB NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    n_tokens INTEGER NOT NULL, PRIMARY KEY(key, manifest_id));
CREATE TABLE IF NOT EXISTS manifest_pieces(
    manifest_id BLOB NOT NULL REFERENCES manifests(id) ON DELETE CASCADE, idx INTEGER NOT NULL,
    hash BLOB NOT NULL, size INTEGER NOT NULL, PRIMARY KEY(manifest_id, idx));
CREATE INDEX IF NOT EXISTS manifest_pieces_hash ON manifest_pieces(hash);
"""
LEGACY_PIECES_TABLE = """
CREATE TABLE IF NOT EXISTS pieces(hash BLOB PRIMARY KEY, size INTEGER NOT NULL);
"""
"""Layout 1's list of stored pieces (files pieces/<ab>/<hash>); read by the migration, then dropped."""
SCHEMA = COMMON_TABLES + """
CREATE TABLE IF NOT EXISTS present(
    manifest_id BLOB NOT NULL REFERENCES manifests(id) ON DELETE CASCADE, idx INTEGER NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY(manifest_id, idx)) WITHOUT ROWID;
"""

# What a read-only open of a store still in the old layout reads instead of `present` (a TEMP view
# shadows the missing table; nothing is written to the file).
LEGACY_PRESENT_VIEW = """
CREATE TEMP VIEW present AS SELECT mp.manifest_id AS manifest_id, mp.idx AS idx, mp.size AS size
FROM manifest_pieces mp JOIN main.pieces p ON p.hash = mp.hash
"""


class StoreIndex:
    """The SQLite index of a store. Callers serialize calls on one instance (one connection)."""

    def __init__(self, db: sqlite3.Connection, read_only: bool) -> None:
        self.db = db
        self.read_only = read_only

    @classmethod
    def open_writable(cls, path: Path) -> StoreIndex:
        # check_same_thread=False: network code calls the store from worker threads, one call at a
        # time (the caller serializes; see kvnet.p2p.server.StoreRunner).
        db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            index = cls(db, read_only=False)
            # An old-layout store gets its version when converted. Written only when it changes: a
            # store on a full disk must still open (to be read, or emptied).
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != LAYOUT_VERSION and not index.has_legacy_pieces():
                db.execute(f"PRAGMA user_version={LAYOUT_VERSION}")
        except sqlite3.Error:
            db.close()
            raise
        return index

    @classmethod
    def open_read_only(cls, path: Path) -> StoreIndex:
        """Open an existing index without writing anything.

        `mode=ro` still needs the WAL's -shm file to exist or be creatable; in a read-only directory
        after a clean shutdown it is neither, and then `immutable=1` is the only way SQLite reads the
        file. That is safe here: nobody can be writing to a directory that is read-only (for us).
        """
        uri = "file:" + urllib.parse.quote(str(path.resolve()))
        last: sqlite3.Error | None = None
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            try:
                db = sqlite3.connect(f"{uri}?{flags}", uri=True, timeout=60, isolation_level=None,
                                     check_same_thread=False)
                db.execute("SELECT COUNT(*) FROM manifests").fetchone()
            except sqlite3.Error as exc:
                last = exc
                continue
            index = cls(db, read_only=True)
            if index.has_legacy_pieces() and not index._has_table("present"):
                db.execute(LEGACY_PRESENT_VIEW)
            return index
        raise last if last is not None else sqlite3.OperationalError("cannot open")

    def close(self) -> None:
        self.db.close()

    def write(self) -> AbstractContextManager[None]:
        """An IMMEDIATE transaction: one writer at a time across processes."""
        return immediate(self.db)

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM main.sqlite_master WHERE type='table' AND name=?",
                               (name,)).fetchone() is not None

    # -- manifests --------------------------------------------------------------------------------

    def has_manifest(self, mid: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM manifests WHERE id=?", (mid,)).fetchone() is not None

    def manifest_ids(self) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT id FROM manifests")]

    def add_manifest(self, sm: SignedManifest) -> None:
        m, now = sm.manifest, time.time()
        with self.write():
            self.db.execute(
                "INSERT OR IGNORE INTO manifests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)",
                (sm.id, m.model_id, m.n_tokens, m.block_size, m.total_bytes, len(m.pieces),
                 m.source.get("title"), m.publisher, m.created, m.expires, now, now),
            )
            self.db.executemany("INSERT OR IGNORE INTO chain VALUES (?,?,?)",
                                [(k, sm.id, m.boundary(i)) for i, k in enumerate(m.chain)])
            self.db.executemany("INSERT OR IGNORE INTO manifest_pieces VALUES (?,?,?,?)",
                                [(sm.id, i, h, m.piece_len(i)) for i, h in enumerate(m.pieces)])

    def remove_manifest(self, mid: bytes) -> None:
        """Drop the manifest and (by cascade) its chain keys, piece list and present marks."""
        with self.write():
            self.db.execute("DELETE FROM manifests WHERE id=?", (mid,))

    def n_pieces(self, mid: bytes) -> int | None:
        row = self.db.execute("SELECT n_pieces FROM manifests WHERE id=?", (mid,)).fetchone()
        return None if row is None else row[0]

    def pinned(self, mid: bytes) -> bool | None:
        row = self.db.execute("SELECT pinned FROM manifests WHERE id=?", (mid,)).fetchone()
        return None if row is None else bool(row[0])

    def touch(self, mid: bytes) -> None:
        with self.write():
            self.db.execute("UPDATE manifests SET last_used=? WHERE id=?", (time.time(), mid))

    def set_pinned(self, mid: bytes, pinned: bool) -> bool:
        """False if there is no such manifest."""
        with self.write():
            cur = self.db.execute("UPDATE manifests SET pinned=? WHERE id=?", (int(pinned), mid))
        return cur.rowcount > 0

    def lru_victim(self, protect: bytes) -> bytes | None:
        """The least recently used unpinned manifest other than `protect`."""
        row = self.db.execute("SELECT id FROM manifests WHERE pinned=0 AND id!=? ORDER BY last_used ASC LIMIT 1",
                              (protect,)).fetchone()
        return None if row is None else row[0]

    def entry_rows(self) -> list[tuple]:
        """(id, model_id, n_tokens, total_bytes, n_pieces, present, title, pinned, last_used), MRU first."""
        return self.db.execute(
            "SELECT m.id, m.model_id, m.n_tokens, m.total_bytes, m.n_pieces, "
            "(SELECT COUNT(*) FROM present p WHERE p.manifest_id=m.id), m.title, m.pinned, m.last_used "
            "FROM manifests m ORDER BY m.last_used DESC").fetchall()

    def gc_rows(self) -> list[tuple]:
        """(id, model_id, publisher, block_size, n_tokens, n_pieces, created, added, title, pinned,
        last chain key) of every manifest."""
        return self.db.execute(
            "SELECT m.id, m.model_id, m.publisher, m.block_size, m.n_tokens, m.n_pieces, m.created, m.added, "
            "m.title, m.pinned, (SELECT c.key FROM chain c WHERE c.manifest_id=m.id ORDER BY c.n_tokens DESC "
            "LIMIT 1) FROM manifests m").fetchall()

    # -- lookup -----------------------------------------------------------------------------------

    def manifests_for_key(self, key: bytes, limit: int) -> list[bytes]:
        rows = self.db.execute(
            "SELECT c.manifest_id FROM chain c JOIN manifests m ON m.id = c.manifest_id WHERE c.key=? "
            "ORDER BY m.last_used DESC LIMIT ?", (key, limit)).fetchall()
        return [r[0] for r in rows]

    def published(self, last_key: bytes, n_tokens: int, model_id: bytes, publisher: bytes,
                  block_size: int, now: int) -> list[tuple[bytes, int]]:
        """(id, n_pieces) of unexpired manifests of exactly these tokens by `publisher`, newest first."""
        return self.db.execute(
            "SELECT m.id, m.n_pieces FROM manifests m JOIN chain c ON c.manifest_id = m.id "
            "WHERE c.key=? AND c.n_tokens=? AND m.model_id=? AND m.publisher=? AND m.block_size=? "
            "AND m.n_tokens=? AND (m.expires = 0 OR m.expires > ?) ORDER BY m.created DESC, m.added DESC",
            (last_key, n_tokens, model_id, publisher, block_size, n_tokens, now)).fetchall()

    def block_sizes(self, model_id: bytes) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT block_size FROM manifests WHERE model_id=?",
                                              (model_id,))]

    def chain_hits(self, keys: list[bytes]) -> list[tuple[bytes, bytes, int]]:
        """(key, manifest_id, n_tokens) for every chain entry whose key is in `keys`."""
        q = ",".join("?" * len(keys))
        return self.db.execute(f"SELECT key, manifest_id, n_tokens FROM chain WHERE key IN ({q})",
                               keys).fetchall()

    def tails(self, model_id: bytes, block_size: int, max_tokens: int) -> list[tuple[bytes, int]]:
        """(id, n_tokens) of manifests whose last block is partial and that fit in `max_tokens`."""
        return self.db.execute(
            "SELECT id, n_tokens FROM manifests WHERE model_id=? AND block_size=? AND n_tokens % block_size != 0 "
            "AND n_tokens <= ?", (model_id, block_size, max_tokens)).fetchall()

    def has_chain_key(self, key: bytes, mid: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM chain WHERE key=? AND manifest_id=?", (key, mid)).fetchone() is not None

    # -- present pieces ---------------------------------------------------------------------------

    def present(self, mid: bytes) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT idx FROM present WHERE manifest_id=?", (mid,))}

    def present_size(self, mid: bytes, idx: int) -> int | None:
        row = self.db.execute("SELECT size FROM present WHERE manifest_id=? AND idx=?", (mid, idx)).fetchone()
        return None if row is None else row[0]

    def present_rows(self, mid: bytes) -> list[tuple[int, int, bytes]]:
        """(idx, size, hash) of the present pieces of `mid`, in index order."""
        return self.db.execute(
            "SELECT p.idx, p.size, mp.hash FROM present p JOIN manifest_pieces mp "
            "ON mp.manifest_id = p.manifest_id AND mp.idx = p.idx WHERE p.manifest_id=? ORDER BY p.idx",
            (mid,)).fetchall()

    def present_bytes(self, mid: bytes) -> tuple[int, int]:
        """(count, bytes) of the present pieces of `mid`."""
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size),0) FROM present WHERE manifest_id=?",
                              (mid,)).fetchone()
        return row[0], row[1]

    def present_ends(self) -> dict[bytes, int]:
        """For each manifest with present pieces, the byte offset its data file must reach to hold
        them all (piece i lies at i x piece_size; every piece but the last is piece_size long, so
        piece 0's size is the piece size). No manifest needs to be parsed for this."""
        return dict(self.db.execute(
            "SELECT p.manifest_id, MAX(p.idx * first.size + p.size) FROM present p JOIN manifest_pieces first "
            "ON first.manifest_id = p.manifest_id AND first.idx = 0 GROUP BY p.manifest_id").fetchall())

    def has_hash(self, h: bytes) -> bool:
        return self.db.execute(
            "SELECT 1 FROM manifest_pieces mp JOIN present p ON p.manifest_id = mp.manifest_id AND p.idx = mp.idx "
            "WHERE mp.hash=? LIMIT 1", (h,)).fetchone() is not None

    def mark_present(self, mid: bytes, pieces: Iterable[tuple[int, int]]) -> None:
        """Mark (idx, size) pieces of `mid` present, in one transaction. Fails (foreign key) if the
        manifest was removed meanwhile, so a removed artifact never gets pieces back."""
        with self.write():
            self.db.executemany("INSERT OR IGNORE INTO present VALUES (?,?,?)",
                                [(mid, i, size) for i, size in pieces])

    def unmark(self, mid: bytes, indices: Iterable[int]) -> None:
        with self.write():
            self.db.executemany("DELETE FROM present WHERE manifest_id=? AND idx=?", [(mid, i) for i in indices])

    def usage(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(size),0) FROM present").fetchone()[0]

    # -- the old layout (pieces/<ab>/<hash>, table `pieces`) ---------------------------------------

    def has_legacy_pieces(self) -> bool:
        return self._has_table("pieces")

    def legacy_pieces(self, mid: bytes) -> list[tuple[int, bytes, int]]:
        """(idx, hash, size) of pieces of `mid` the old layout holds."""
        return self.db.execute(
            "SELECT mp.idx, mp.hash, mp.size FROM manifest_pieces mp JOIN main.pieces p ON p.hash = mp.hash "
            "WHERE mp.manifest_id=? ORDER BY mp.idx", (mid,)).fetchall()

    def drop_legacy(self) -> None:
        with self.write():
            self.db.execute("DROP TABLE IF EXISTS main.pieces")
            self.db.execute(f"PRAGMA user_version={LAYOUT_VERSION}")
