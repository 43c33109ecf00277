"""The local store: content-addressed pieces and manifests on disk, indexed in SQLite.

Layout under the store root:
    index.sqlite            manifests, chain keys, piece lists, present pieces, sizes, last use, pins
    manifests/<id>.msgpack  signed manifest bytes
    pieces/<ab>/<hash>      piece bytes, named by their BLAKE3
    tmp/<pid>-<rand>        writes in progress

Crash safety: every file is written to tmp/, fsynced and renamed into place, and only then recorded in
the index. A piece is served or loaded only if the index lists it, and the index lists it only after
its bytes were verified and durably renamed; a writer killed at any point leaves at worst a stray tmp
file (removed on the next open) or an unindexed file (re-verified and adopted, or deleted, on open).
Several processes may use one store: SQLite runs in WAL mode with a busy timeout.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvnet import chain
from kvnet.artifact import ArtifactError, verify_piece
from kvnet.errors import KvnetError
from kvnet.hashing import b3
from kvnet.manifest import ManifestError, SignedManifest, parse

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS pieces(hash BLOB PRIMARY KEY, size INTEGER NOT NULL);
"""


class StoreError(KvnetError):
    """A store operation failed; the store is unchanged."""


class StoreFullError(StoreError):
    """No room for a write, even after evicting everything that may be evicted."""


class NotFoundError(StoreError, KeyError):
    """No such manifest or piece in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True)
class Entry:
    """One artifact in the index."""

    id: bytes
    model_id: bytes
    n_tokens: int
    total_bytes: int
    n_pieces: int
    present: int
    title: str | None
    pinned: bool
    last_used: float

    @property
    def complete(self) -> bool:
        return self.present == self.n_pieces


@dataclass(frozen=True)
class Match:
    """The longest stored prefix of a token sequence: load `n_tokens` tokens of manifest `manifest_id`."""

    manifest_id: bytes
    n_tokens: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A crash-safe, multi-process local store of KV artifacts."""

    def __init__(self, root: Path, capacity_bytes: int | None = None, verify_on_read: bool = False) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.verify_on_read = verify_on_read
        self._manifests: dict[bytes, SignedManifest] = {}  # parsed and verified; immutable by id
        for sub in ("manifests", "pieces", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: network code calls the store from worker threads, one call at a
        # time (the caller serializes; see kvnet.p2p.server.StoreRunner).
        self.db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                self.db.execute(stmt)
        self.recover()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[None]:
        """An IMMEDIATE transaction: one writer at a time across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise StoreFullError(f"disk full while updating the index: {exc}; nothing was changed") from exc
            raise

    def _piece_path(self, h: bytes) -> Path:
        x = h.hex()
        return self.root / "pieces" / x[:2] / x

    def _manifest_path(self, mid: bytes) -> Path:
        return self.root / "manifests" / f"{mid.hex()}.msgpack"

    def _atomic_write(self, path: Path, data: bytes | memoryview, sync_dir: bool = True) -> None:
        """tmp file, fsync, rename, fsync dir (or leave that to the caller, once for a batch).
        ENOSPC becomes StoreFullError with nothing left behind."""
        tmp = self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            if sync_dir:
                _fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFullError(f"disk full while writing {path.name}; nothing was stored") from exc
            raise StoreError(f"cannot write {path}: {exc}") from exc

    # -- manifests ------------------------------------------------------------------------------

    def put_manifest(self, raw: bytes) -> SignedManifest:
        """Verify and record a signed manifest. Its pieces may follow later (partial artifacts)."""
        sm = parse(raw)
        if self._manifest_row(sm.id) is not None:
            return sm
        self._atomic_write(self._manifest_path(sm.id), sm.raw)
        self._index_manifest(sm)
        return sm

    def _index_manifest(self, sm: SignedManifest) -> None:
        m, now = sm.manifest, time.time()
        with self._write():
            self.db.execute(
                "INSERT OR IGNORE INTO manifests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)",
                (sm.id, m.model_id, m.n_tokens, m.block_size, m.total_bytes, len(m.pieces),
                 m.source.get("title"), m.publisher, m.created, m.expires, now, now),
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO chain VALUES (?,?,?)",
                [(k, sm.id, m.boundary(i)) for i, k in enumerate(m.chain)],
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO manifest_pieces VALUES (?,?,?,?)",
                [(sm.id, i, h, m.piece_len(i)) for i, h in enumerate(m.pieces)],
            )

    def _manifest_row(self, mid: bytes) -> tuple | None:
        return self.db.execute("SELECT id FROM manifests WHERE id=?", (mid,)).fetchone()

    def get_manifest(self, mid: bytes) -> SignedManifest:
        if self._manifest_row(mid) is None:
            self._manifests.pop(mid, None)
            raise NotFoundError(f"no manifest {mid.hex()} in the store")
        if mid in self._manifests:
            return self._manifests[mid]
        try:
            raw = self._manifest_path(mid).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"manifest {mid.hex()} was removed") from exc
        sm = parse(raw, allow_expired=True)
        if sm.id != mid:
            raise StoreError(f"manifest file for {mid.hex()} holds {sm.id.hex()}")
        self._manifests[mid] = sm
        return sm

    def manifests_for_key(self, key: bytes, limit: int = 8) -> list[bytes]:
        """Manifests whose id is `key`, or that have `key` as a chain key (most recently used first)."""
        if self._manifest_row(key) is not None:
            return [key]
        rows = self.db.execute(
            "SELECT c.manifest_id FROM chain c JOIN manifests m ON m.id = c.manifest_id WHERE c.key=? "
            "ORDER BY m.last_used DESC LIMIT ?", (key, limit)).fetchall()
        return [r[0] for r in rows]

    def resolve_id(self, prefix: str) -> bytes:
        """A full manifest id from a unique hex prefix (for the CLI)."""
        rows = self.db.execute("SELECT id FROM manifests").fetchall()
        hits = [r[0] for r in rows if r[0].hex().startswith(prefix.lower())]
        if not hits:
            raise NotFoundError(f"no manifest id starts with {prefix!r}")
        if len(hits) > 1:
            raise StoreError(f"{prefix!r} is ambiguous ({len(hits)} manifests)")
        return hits[0]

    # -- pieces ---------------------------------------------------------------------------------

    def has_piece(self, h: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM pieces WHERE hash=?", (h,)).fetchone() is not None

    def put_piece(self, mid: bytes, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Verify piece `index` of manifest `mid` and store it. Returns False if it was already present."""
        stored, errors = self.put_pieces(mid, [(index, data)])
        if errors:
            raise errors[index]
        return bool(stored)

    def put_pieces(self, mid: bytes, items: list[tuple[int, bytes | bytearray | memoryview]]
                   ) -> tuple[list[int], dict[int, ArtifactError]]:
        """Verify and store several pieces of `mid` as one group commit.

        Each piece is verified against the signed manifest first; those that fail are returned (not
        raised) so that a fetcher can blame the peer that sent each one. The good ones are written
        and fsynced one by one, their directories fsynced once, and indexed in one transaction: one
        index commit per batch instead of per piece. Returns (indices newly stored, failures).
        """
        m = self.get_manifest(mid).manifest
        errors: dict[int, ArtifactError] = {}
        todo: dict[bytes, tuple[int, bytes | bytearray | memoryview]] = {}
        for index, data in items:
            try:
                verify_piece(m, index, data)
            except ArtifactError as exc:
                errors[index] = exc
                continue
            h = m.pieces[index]
            if h not in todo and not self.has_piece(h):
                todo[h] = (index, data)
        if not todo:
            return [], errors
        self._make_room(sum(len(d) for _, d in todo.values()), protect=mid)
        dirs = set()
        for h, (_, data) in todo.items():
            path = self._piece_path(h)
            self._atomic_write(path, data, sync_dir=False)
            dirs.add(path.parent)
        for d in dirs:
            _fsync_dir(d)
        with self._write():
            self.db.executemany("INSERT OR IGNORE INTO pieces VALUES (?,?)",
                                [(h, len(d)) for h, (_, d) in todo.items()])
        return [i for i, _ in todo.values()], errors

    def read_piece(self, mid: bytes, index: int, verify: bool | None = None) -> bytearray:
        """Bytes of piece `index` of `mid`, if present. With `verify` (default: the store's
        verify_on_read) the bytes are re-hashed and a corrupt file is dropped from the index."""
        row = self.db.execute(
            "SELECT mp.hash, mp.size FROM manifest_pieces mp JOIN pieces p ON p.hash = mp.hash "
            "WHERE mp.manifest_id=? AND mp.idx=?", (mid, index)).fetchone()
        if row is None:
            raise NotFoundError(f"piece {index} of {mid.hex()[:16]} is not in the store")
        h, size = row
        try:
            with open(self._piece_path(h), "rb") as f:
                data = bytearray(size)
                got = f.readinto(data)
            del data[got:]
        except FileNotFoundError as exc:
            self._forget_piece(h)
            raise NotFoundError(f"piece {index} of {mid.hex()[:16]} was removed") from exc
        if (self.verify_on_read if verify is None else verify) and (len(data) != size or b3(data) != h):
            self._forget_piece(h)
            raise ArtifactError(f"piece {index} of {mid.hex()[:16]}: stored bytes are corrupt; dropped")
        return data

    def _forget_piece(self, h: bytes) -> None:
        with self._write():
            self.db.execute("DELETE FROM pieces WHERE hash=?", (h,))
        self._piece_path(h).unlink(missing_ok=True)

    def present_pieces(self, mid: bytes) -> set[int]:
        rows = self.db.execute(
            "SELECT mp.idx FROM manifest_pieces mp JOIN pieces p ON p.hash = mp.hash WHERE mp.manifest_id=?",
            (mid,)).fetchall()
        return {r[0] for r in rows}

    def missing_pieces(self, mid: bytes) -> list[int]:
        """Pieces still to fetch: a resumed fetch asks only for these."""
        n = self.db.execute("SELECT n_pieces FROM manifests WHERE id=?", (mid,)).fetchone()
        if n is None:
            raise NotFoundError(f"no manifest {mid.hex()} in the store")
        have = self.present_pieces(mid)
        return [i for i in range(n[0]) if i not in have]

    # -- listing, use, pins, eviction -----------------------------------------------------------

    def entries(self) -> list[Entry]:
        rows = self.db.execute(
            "SELECT m.id, m.model_id, m.n_tokens, m.total_bytes, m.n_pieces, "
            "(SELECT COUNT(*) FROM manifest_pieces mp JOIN pieces p ON p.hash=mp.hash "
            " WHERE mp.manifest_id=m.id), m.title, m.pinned, m.last_used "
            "FROM manifests m ORDER BY m.last_used DESC").fetchall()
        return [Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8]) for r in rows]

    def touch(self, mid: bytes) -> None:
        with self._write():
            self.db.execute("UPDATE manifests SET last_used=? WHERE id=?", (time.time(), mid))

    def pin(self, mid: bytes, pinned: bool = True) -> None:
        with self._write():
            cur = self.db.execute("UPDATE manifests SET pinned=? WHERE id=?", (int(pinned), mid))
        if cur.rowcount == 0:
            raise NotFoundError(f"no manifest {mid.hex()} in the store")

    def usage(self) -> int:
        """Bytes of pieces on disk (manifests are small and not counted)."""
        return self.db.execute("SELECT COALESCE(SUM(size),0) FROM pieces").fetchone()[0]

    def remove(self, mid: bytes) -> None:
        """Drop a manifest and every piece no other manifest uses."""
        with self._write():
            hashes = [r[0] for r in self.db.execute(
                "SELECT hash FROM manifest_pieces WHERE manifest_id=?", (mid,))]
            self.db.execute("DELETE FROM manifests WHERE id=?", (mid,))
            orphans = [h for h in hashes if self.db.execute(
                "SELECT 1 FROM manifest_pieces WHERE hash=? LIMIT 1", (h,)).fetchone() is None]
            self.db.executemany("DELETE FROM pieces WHERE hash=?", [(h,) for h in orphans])
        for h in orphans:
            self._piece_path(h).unlink(missing_ok=True)
        self._manifest_path(mid).unlink(missing_ok=True)

    def _make_room(self, incoming: int, protect: bytes) -> None:
        """Evict least-recently-used unpinned artifacts until `incoming` more bytes fit."""
        if self.capacity_bytes is None:
            return
        while self.usage() + incoming > self.capacity_bytes:
            victim = self.db.execute(
                "SELECT id FROM manifests WHERE pinned=0 AND id!=? ORDER BY last_used ASC LIMIT 1",
                (protect,)).fetchone()
            if victim is None:
                raise StoreFullError(
                    f"store capacity {self.capacity_bytes} B reached ({self.usage()} B used, "
                    f"{incoming} B more needed) and nothing unpinned is left to evict")
            self.remove(victim[0])

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, model_id: bytes, tokens: list[int]) -> Match | None:
        """The longest prefix of `tokens` whose KV the store can load now (all covering pieces present)."""
        if not tokens:
            return None
        best: Match | None = None
        sizes = [r[0] for r in self.db.execute(
            "SELECT DISTINCT block_size FROM manifests WHERE model_id=?", (model_id,))]
        for bs in sizes:
            for mid, n in self._matches(model_id, tokens, bs):
                if (best is None or n > best.n_tokens) and self._loadable(mid, n):
                    best = Match(mid, n)
        return best

    def _matches(self, model_id: bytes, tokens: list[int], bs: int) -> list[tuple[bytes, int]]:
        keys = chain.chain_keys(model_id, tokens, bs)
        by_key = {k.key: k.n_tokens for k in keys}
        hits: list[tuple[bytes, int]] = []
        q = ",".join("?" * len(by_key))
        for key, mid, n in self.db.execute(
                f"SELECT key, manifest_id, n_tokens FROM chain WHERE key IN ({q})", list(by_key)):
            if by_key[key] == n:
                hits.append((mid, n))
        # A document's partial last block: test the prompt's own key over the same token count.
        matched_at: dict[bytes, int] = {}
        for mid, n in hits:
            matched_at[mid] = max(n, matched_at.get(mid, 0))
        tails = self.db.execute(
            "SELECT id, n_tokens FROM manifests WHERE model_id=? AND block_size=? AND n_tokens % block_size != 0 "
            "AND n_tokens <= ?", (model_id, bs, len(tokens))).fetchall()
        for mid, n in tails:
            full = (n // bs) * bs
            if full and matched_at.get(mid) != full:
                continue
            key = chain.key_at(model_id, tokens, n, bs)
            if self.db.execute("SELECT 1 FROM chain WHERE key=? AND manifest_id=?", (key, mid)).fetchone():
                hits.append((mid, n))
        return hits

    def _loadable(self, mid: bytes, n_tokens: int) -> bool:
        m = self.get_manifest(mid).manifest
        have = self.present_pieces(mid)
        return all(i in have for i in m.pieces_for_tokens(n_tokens))

    # -- recovery -------------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Make disk and index agree after a crash. Safe while other processes use the store."""
        report = {"tmp_removed": 0, "pieces_adopted": 0, "pieces_dropped": 0, "manifests_adopted": 0}
        for tmp in (self.root / "tmp").iterdir():
            pid = tmp.name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                report["tmp_removed"] += 1
        for path in (self.root / "manifests").glob("*.msgpack"):
            try:
                mid = bytes.fromhex(path.stem)
            except ValueError:
                continue
            if self._manifest_row(mid) is None:
                try:
                    sm = parse(path.read_bytes(), allow_expired=True)
                except ManifestError:
                    path.unlink(missing_ok=True)
                    continue
                if sm.id == mid:
                    self._index_manifest(sm)
                    report["manifests_adopted"] += 1
        for sub in (self.root / "pieces").iterdir():
            for path in sub.iterdir():
                try:
                    h = bytes.fromhex(path.name)
                except ValueError:
                    continue
                if self.has_piece(h):
                    continue
                referenced = self.db.execute(
                    "SELECT size FROM manifest_pieces WHERE hash=? LIMIT 1", (h,)).fetchone()
                data = path.read_bytes() if referenced else b""
                if referenced and len(data) == referenced[0] and b3(data) == h:
                    with self._write():
                        self.db.execute("INSERT OR IGNORE INTO pieces VALUES (?,?)", (h, len(data)))
                    report["pieces_adopted"] += 1
                else:
                    path.unlink(missing_ok=True)
                    report["pieces_dropped"] += 1
        return report

    def check(self, deep: bool = True) -> list[str]:
        """Problems found (empty when consistent): indexed pieces missing or corrupt, manifests unreadable."""
        problems: list[str] = []
        for (mid,) in self.db.execute("SELECT id FROM manifests").fetchall():
            try:
                self.get_manifest(mid)
            except (StoreError, ManifestError) as exc:
                problems.append(f"manifest {mid.hex()[:16]}: {exc}")
        for h, size in self.db.execute("SELECT hash, size FROM pieces").fetchall():
            path = self._piece_path(h)
            if not path.is_file():
                problems.append(f"piece {h.hex()[:16]}: indexed but missing on disk")
            elif path.stat().st_size != size or (deep and b3(path.read_bytes()) != h):
                problems.append(f"piece {h.hex()[:16]}: bytes do not match their hash")
        return problems
