"""FROZEN: kvnet/store.py as it was before the data-file layout (git show 8f7f0d4:kvnet/store.py), kept
only so tests can build a store in the old layout (pieces/<ab>/<hash>, table `pieces`) and check that
the current store converts it (tests/test_store.py). Do not edit or import it from kvnet.

The local store: content-addressed pieces and manifests on disk, indexed in SQLite.

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

A store can also be opened read-only (`read_only=True`: listing, showing and verifying on a read-only
home). It then never writes: no recovery, no index changes, corrupt pieces are reported but not dropped.
An unwritable or unusable store directory is a `StoreError` naming the directory, never a raw
sqlite3 or OS error.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvnet import chain
from kvnet.errors import KvnetError
from kvnet.hashing import b3
from kvnet.manifest import ManifestError, SignedManifest, parse
from kvnet.pieces import ArtifactError, verify_piece

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


class AmbiguousIdError(StoreError):
    """An id prefix matches several manifests; `candidates` lists them so a caller can show them."""

    def __init__(self, message: str, candidates: list[Entry]) -> None:
        super().__init__(message)
        self.candidates = candidates


class PinnedError(StoreError):
    """The artifact is pinned; removing it needs an explicit force."""


@dataclass(frozen=True)
class GcItem:
    """One artifact `gc` removes (or would remove), and why: "partial" or "superseded"."""

    id: bytes
    reason: str
    superseded_by: bytes | None
    n_tokens: int
    title: str | None
    piece_bytes: int  # bytes of its pieces on disk (some may be shared with artifacts that stay)


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


def _reason(exc: BaseException | None) -> str:
    """A short human reason for an OS or SQLite error (no errno tuple, no class name)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A crash-safe, multi-process local store of KV artifacts."""

    def __init__(self, root: Path, capacity_bytes: int | None = None, verify_on_read: bool = False,
                 read_only: bool = False) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.verify_on_read = verify_on_read
        self.read_only = read_only
        self._manifests: dict[bytes, SignedManifest] = {}  # parsed and verified; immutable by id
        self.db = self._open_read_only() if read_only else self._open_writable()

    def _open_writable(self) -> sqlite3.Connection:
        """Create (if needed), open and recover the store; any OS or SQLite failure names the directory."""
        db = None
        try:
            for sub in ("manifests", "pieces", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._probe_write()
            # check_same_thread=False: network code calls the store from worker threads, one call at a
            # time (the caller serializes; see kvnet.p2p.server.StoreRunner).
            db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            self.db = db
            self.recover()
        except (OSError, sqlite3.Error) as exc:
            if db is not None:
                db.close()
            raise StoreError(f"cannot write to the store directory {self.root}: {_reason(exc)}") from exc
        return db

    def _probe_write(self) -> None:
        """Create and remove a file in tmp/: a read-only directory fails here with the OS's own reason
        ("Read-only file system", "Permission denied") instead of SQLite's "unable to open database file"."""
        probe = self.root / "tmp" / f"{os.getpid()}-probe-{secrets.token_hex(4)}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()

    def _open_read_only(self) -> sqlite3.Connection:
        """Open an existing index without writing anything.

        `mode=ro` still needs the WAL's -shm file to exist or be creatable; in a read-only directory
        after a clean shutdown it is neither, and then `immutable=1` is the only way SQLite reads the
        file. That is safe here: nobody can be writing to a directory that is read-only (for us).
        """
        index = self.root / "index.sqlite"
        if not index.is_file():
            raise NotFoundError(f"no store at {self.root} (nothing was published or fetched there yet)")
        uri = "file:" + urllib.parse.quote(str(index.resolve()))
        last: sqlite3.Error | None = None
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            try:
                db = sqlite3.connect(f"{uri}?{flags}", uri=True, timeout=60, isolation_level=None,
                                     check_same_thread=False)
                db.execute("SELECT COUNT(*) FROM manifests").fetchone()
                return db
            except sqlite3.Error as exc:
                last = exc
        raise StoreError(f"cannot read the store index {index}: {_reason(last)}")

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
        """A full manifest id from a unique hex prefix (for the CLI).

        An ambiguous prefix raises `AmbiguousIdError` carrying the candidates, so the user can pick."""
        hits = self.entries(prefix)
        if not hits:
            raise NotFoundError(f"no manifest id starts with {prefix!r}")
        if len(hits) > 1:
            raise AmbiguousIdError(f"{prefix!r} is ambiguous: {len(hits)} manifests start with it", hits)
        return hits[0].id

    def find_published(self, model_id: bytes, publisher: bytes, tokens: list[int], block_size: int) -> bytes | None:
        """A complete artifact by `publisher` of exactly these tokens (same model, same block size).

        The last chain key commits to every token (it is a hash chain), so (model, block size, token
        count, last key) identifies the token sequence. Used to avoid publishing a document twice.
        Among several, the newest (latest `created`) is returned; an expired one never is.
        """
        if not tokens:
            return None
        last = chain.key_at(model_id, tokens, len(tokens), block_size)
        rows = self.db.execute(
            "SELECT m.id, m.n_pieces FROM manifests m JOIN chain c ON c.manifest_id = m.id "
            "WHERE c.key=? AND c.n_tokens=? AND m.model_id=? AND m.publisher=? AND m.block_size=? "
            "AND m.n_tokens=? AND (m.expires = 0 OR m.expires > ?) ORDER BY m.created DESC, m.added DESC",
            (last, len(tokens), model_id, publisher, block_size, len(tokens), int(time.time()))).fetchall()
        for mid, n_pieces in rows:
            if len(self.present_pieces(mid)) == n_pieces:
                return mid
        return None

    # -- pieces ---------------------------------------------------------------------------------

    def has_piece(self, h: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM pieces WHERE hash=?", (h,)).fetchone() is not None

    def put_piece(self, mid: bytes, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Verify piece `index` of manifest `mid` and store it. Returns False if it was already present."""
        stored, errors = self.put_pieces(mid, [(index, data)])
        if errors:
            raise errors[index]
        return bool(stored)

    def put_pieces(self, mid: bytes, items: list[tuple[int, bytes | bytearray | memoryview]],
                   verified: bool = False) -> tuple[list[int], dict[int, ArtifactError]]:
        """Verify and store several pieces of `mid` as one group commit.

        Each piece is verified against the signed manifest first; those that fail are returned (not
        raised) so that a fetcher can blame the peer that sent each one. The good ones are written
        and fsynced one by one, their directories fsynced once, and indexed in one transaction: one
        index commit per batch instead of per piece. Returns (indices newly stored, failures).
        `verified=True` says the caller already ran `verify_piece` on these exact bytes against this
        manifest (the fetcher does, as each piece arrives), so they are not hashed a second time.
        """
        m = self.get_manifest(mid).manifest
        errors: dict[int, ArtifactError] = {}
        todo: dict[bytes, tuple[int, bytes | bytearray | memoryview]] = {}
        for index, data in items:
            try:
                if not verified:
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
        if self.read_only:  # reported by the caller; dropping it is left to a writable open
            return
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

    def entries(self, prefix: str = "") -> list[Entry]:
        """Stored artifacts, most recently used first; only ids starting with hex `prefix` if given."""
        rows = self.db.execute(
            "SELECT m.id, m.model_id, m.n_tokens, m.total_bytes, m.n_pieces, "
            "(SELECT COUNT(*) FROM manifest_pieces mp JOIN pieces p ON p.hash=mp.hash "
            " WHERE mp.manifest_id=m.id), m.title, m.pinned, m.last_used "
            "FROM manifests m ORDER BY m.last_used DESC").fetchall()
        prefix = prefix.lower()
        return [Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8]) for r in rows
                if r[0].hex().startswith(prefix)]

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

    def delete(self, mid: bytes, force: bool = False) -> None:
        """Remove one artifact on request (`kvnet rm`). A pinned one is kept unless `force`."""
        row = self.db.execute("SELECT pinned FROM manifests WHERE id=?", (mid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no manifest {mid.hex()} in the store")
        if row[0] and not force:
            raise PinnedError(f"{mid.hex()[:16]} is pinned; unpin it (`kvnet pin --off`) or use --force")
        self.remove(mid)

    def gc_candidates(self) -> list[GcItem]:
        """Unpinned artifacts that are partial or superseded: what `gc` removes.

        partial:    some of its pieces are missing (an interrupted or prefix-only fetch, or evicted pieces).
        superseded: another manifest in the store by the same publisher covers exactly the same tokens
                    (same model, block size, token count and last chain key), is complete, and is newer
                    (later `created`; ties broken by later arrival, then id). A publisher supersedes
                    its own manifest by publishing the same document again with --force (new terms,
                    title or expiry); the old one only takes space.
        Pinned artifacts are never candidates.
        """
        rows = self.db.execute(
            "SELECT m.id, m.model_id, m.publisher, m.block_size, m.n_tokens, m.n_pieces, m.created, m.added, "
            "m.title, m.pinned, (SELECT c.key FROM chain c WHERE c.manifest_id=m.id ORDER BY c.n_tokens DESC "
            "LIMIT 1) FROM manifests m").fetchall()
        present = {r[0]: self._present_bytes(r[0]) for r in rows}
        newest: dict[tuple, tuple] = {}
        for r in rows:
            if present[r[0]][0] == r[5]:  # complete
                group = (r[1], r[2], r[3], r[4], r[10])
                if group not in newest or (r[6], r[7], r[0]) > newest[group][:3]:
                    newest[group] = (r[6], r[7], r[0])
        out: list[GcItem] = []
        for r in rows:
            if r[9]:
                continue
            best = newest.get((r[1], r[2], r[3], r[4], r[10]))
            n_present, nbytes = present[r[0]]
            if best is not None and best[2] != r[0] and best[:3] > (r[6], r[7], r[0]):
                out.append(GcItem(r[0], "superseded", best[2], r[4], r[8], nbytes))
            elif n_present < r[5]:
                out.append(GcItem(r[0], "partial", None, r[4], r[8], nbytes))
        return out

    def _present_bytes(self, mid: bytes) -> tuple[int, int]:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(p.size),0) FROM manifest_pieces mp JOIN pieces p ON p.hash = mp.hash "
            "WHERE mp.manifest_id=?", (mid,)).fetchone()
        return row[0], row[1]

    def gc(self, dry_run: bool = False) -> list[GcItem]:
        """Remove partial and superseded artifacts (see `gc_candidates`); with `dry_run`, only list them."""
        items = self.gc_candidates()
        if not dry_run:
            for item in items:
                self.remove(item.id)
        return items

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
