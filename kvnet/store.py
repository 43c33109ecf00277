"""The local store: signed manifests and their pieces on disk, indexed in SQLite.

Layout under the store root (docs/artifact.md, "The local store"):
    index.sqlite            manifests, chain keys, piece lists, present pieces, sizes, last use, pins
    manifests/<id>.msgpack  signed manifest bytes (tmp + fsync + rename)
    data/<id>.kv            one sparse file per artifact: piece i at offset i x piece_size
    tmp/<pid>-<rand>        manifest writes in progress

`Store` is the public face; it composes the SQLite index (kvnet.store_index: what is present) and the
data files (kvnet.store_files: where the bytes are), and owns the policy between them: verify, write a
group of pieces and fdatasync it once, then mark the group present in one transaction. A piece is
served or loaded only if the index marks it present, and it is marked only after its bytes were
verified and made durable; a writer killed at any point leaves at worst unmarked bytes in a data file
(overwritten by the next fetch of that piece), a stray tmp file, or an unindexed manifest file, all
handled on the next writable open. Several processes may use one store: SQLite runs in WAL mode.

A store in the old layout (pieces/<ab>/<hash>, one file per piece) is converted on its first writable
open; a read-only open reads it in place. A store can be opened read-only (`read_only=True`: listing,
showing and verifying on a read-only home); it then never writes: no recovery, no migration, corrupt
pieces are reported but not dropped. An unwritable or unusable store directory is a `StoreError`
naming the directory, never a raw sqlite3 or OS error.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvnet import chain
from kvnet.errors import KvnetError
from kvnet.hashing import b3
from kvnet.manifest import ManifestError, SignedManifest, parse
from kvnet.pieces import ArtifactError, verify_piece
from kvnet.store_files import DataFiles, fsync_dir
from kvnet.store_index import StoreIndex

if TYPE_CHECKING:
    from kvnet.store_writer import GroupWriter

MIGRATE_GROUP = 16  # old-layout pieces moved per fdatasync and index commit when converting a store


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
    piece_bytes: int  # bytes of its present pieces: what removing it frees


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


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


Piece = bytes | bytearray | memoryview


class Store:
    """A crash-safe, multi-process local store of KV artifacts."""

    def __init__(self, root: Path, capacity_bytes: int | None = None, verify_on_read: bool = False,
                 read_only: bool = False, direct_io: bool | None = None) -> None:
        """`direct_io`: write pieces with O_DIRECT (True), never (False) or where supported (None)."""
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.verify_on_read = verify_on_read
        self.read_only = read_only
        self._manifests: dict[bytes, SignedManifest] = {}  # parsed and verified; immutable by id
        self.files = DataFiles(self.root / "data", direct=direct_io)
        self.index = self._open_read_only() if read_only else self._open_writable()
        # Only a read-only open can see the old layout: a writable open has converted it.
        self._legacy = read_only and self.index.has_legacy_pieces()
        self.db = self.index.db  # the SQLite connection, for tests and diagnostics

    def _open_writable(self) -> StoreIndex:
        """Create (if needed), open, migrate and recover the store; any OS or SQLite failure names
        the directory (a full disk during migration is a StoreFullError)."""
        index = None
        try:
            for sub in ("manifests", "data", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._probe_write()
            index = self.index = StoreIndex.open_writable(self.root / "index.sqlite")
            self.recover()
        except (OSError, sqlite3.Error, StoreError) as exc:
            if index is not None:
                index.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot write to the store directory {self.root}: {_reason(exc)}") from exc
        return index

    def _probe_write(self) -> None:
        """Create and remove a file in tmp/: a read-only directory fails here with the OS's own reason
        ("Read-only file system", "Permission denied") instead of SQLite's "unable to open database file"."""
        probe = self.root / "tmp" / f"{os.getpid()}-probe-{secrets.token_hex(4)}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()

    def _open_read_only(self) -> StoreIndex:
        index = self.root / "index.sqlite"
        if not index.is_file():
            raise NotFoundError(f"no store at {self.root} (nothing was published or fetched there yet)")
        try:
            return StoreIndex.open_read_only(index)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store index {index}: {_reason(exc)}") from exc

    def close(self) -> None:
        self.index.close()
        self.files.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _sql(self, what: str) -> Iterator[None]:
        """Index errors as StoreErrors: a full disk is StoreFullError (the transaction rolled back)."""
        try:
            yield
        except sqlite3.Error as exc:
            if "full" in str(exc):
                raise StoreFullError(f"disk full while {what}: {exc}; nothing was changed") from exc
            raise StoreError(f"index error while {what} in {self.root}: {exc}") from exc

    def _manifest_path(self, mid: bytes) -> Path:
        return self.root / "manifests" / f"{mid.hex()}.msgpack"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """tmp file, fsync, rename, fsync dir. ENOSPC becomes StoreFullError with nothing left behind."""
        tmp = self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if _disk_full(exc):
                raise StoreFullError(f"disk full while writing {path.name}; nothing was stored") from exc
            raise StoreError(f"cannot write {path}: {exc}") from exc

    # -- manifests ------------------------------------------------------------------------------

    def put_manifest(self, raw: bytes) -> SignedManifest:
        """Verify and record a signed manifest. Its pieces may follow later (partial artifacts)."""
        sm = parse(raw)
        if self.index.has_manifest(sm.id):
            return sm
        self._atomic_write(self._manifest_path(sm.id), sm.raw)
        with self._sql("recording a manifest"):
            self.index.add_manifest(sm)
        return sm

    def get_manifest(self, mid: bytes) -> SignedManifest:
        if not self.index.has_manifest(mid):
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
        if self.index.has_manifest(key):
            return [key]
        return self.index.manifests_for_key(key, limit)

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
        for mid, n_pieces in self.index.published(last, len(tokens), model_id, publisher, block_size,
                                                  int(time.time())):
            if len(self.present_pieces(mid)) == n_pieces:
                return mid
        return None

    # -- pieces ---------------------------------------------------------------------------------

    def has_piece(self, h: bytes) -> bool:
        """Whether some artifact in the store holds a present piece with BLAKE3 `h`."""
        return self.index.has_hash(h)

    def put_piece(self, mid: bytes, index: int, data: Piece) -> bool:
        """Verify piece `index` of manifest `mid` and store it. Returns False if it was already present."""
        stored, errors = self.put_pieces(mid, [(index, data)])
        if errors:
            raise errors[index]
        return bool(stored)

    def put_pieces(self, mid: bytes, items: list[tuple[int, Piece]],
                   verified: bool = False) -> tuple[list[int], dict[int, ArtifactError]]:
        """Verify and store several pieces of `mid` as one group commit.

        Each piece is verified against the signed manifest first; those that fail are returned (not
        raised) so that a fetcher can blame the peer that sent each one. The good ones are written at
        their offsets in the artifact's data file, made durable with one fdatasync, and marked present
        in one index transaction. Returns (indices newly stored, failures).
        `verified=True` says the caller already ran `verify_piece` on these exact bytes against this
        manifest (the fetcher does, as each piece arrives), so they are not hashed a second time.
        """
        m = self.get_manifest(mid).manifest
        errors: dict[int, ArtifactError] = {}
        have = self.index.present(mid)
        todo: dict[int, Piece] = {}
        for index, data in items:
            try:
                if not verified:
                    verify_piece(m, index, data)
                elif not 0 <= index < len(m.pieces) or len(data) != m.piece_len(index):
                    raise ArtifactError(f"piece {index}: {len(data)} bytes do not fit the manifest")
            except ArtifactError as exc:
                errors[index] = exc
                continue
            if index not in have:
                todo.setdefault(index, data)
        if not todo:
            return [], errors
        self._make_room(sum(len(d) for d in todo.values()), protect=mid)
        self._write_group(mid, sorted(todo.items()))
        return sorted(todo), errors

    def group_writer(self, mid: bytes, reserve: int = 0, **kw: object) -> GroupWriter:
        """A thread-side writer of verified pieces of `mid` (kvnet.store_writer.GroupWriter): what a
        fetch uses, so that pieces go from receiver threads to disk without an event loop in between.
        Room for `reserve` more bytes is made first (LRU eviction, as `put_pieces` does per group).
        Call from the thread that uses this Store; the writer then runs on its own threads and index
        connection."""
        from kvnet.store_writer import GroupWriter  # noqa: PLC0415 - kvnet.store_writer builds on this module

        self.get_manifest(mid)
        self._make_room(reserve, protect=mid)
        return GroupWriter(self, mid, **kw)  # type: ignore[arg-type]

    def _write_group(self, mid: bytes, items: Sequence[tuple[int, Piece]]) -> None:
        """Write verified pieces, one fdatasync, then mark them present in one transaction: the
        durability rule. On any failure nothing is marked (bytes already written stay unmarked)."""
        piece_size = self.get_manifest(mid).manifest.piece_size
        try:
            self.files.write_group(mid, [(i * piece_size, d) for i, d in items])
        except OSError as exc:
            if _disk_full(exc):
                raise StoreFullError(f"disk full while writing pieces of {mid.hex()[:16]}; "
                                     "nothing was stored") from exc
            raise StoreError(f"cannot write {self.files.path(mid)}: {_reason(exc)}") from exc
        try:
            with self._sql("marking pieces present"):
                self.index.mark_present(mid, [(i, len(d)) for i, d in items])
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):  # the manifest was removed meanwhile
                raise NotFoundError(f"manifest {mid.hex()[:16]} was removed while its pieces were written") from exc
            raise

    def read_piece(self, mid: bytes, index: int, verify: bool | None = None) -> bytearray:
        """Bytes of piece `index` of `mid`, if present. With `verify` (default: the store's
        verify_on_read) the bytes are re-hashed and a corrupt piece is dropped from the index. A data
        file that is gone or shorter than the index says drops the pieces it lost (NotFoundError)."""
        size = self.index.present_size(mid, index)
        if size is None:
            raise NotFoundError(f"piece {index} of {mid.hex()[:16]} is not in the store")
        m = self.get_manifest(mid).manifest
        data = self._read_present(mid, index, size, m.piece_size)
        if len(data) != size:
            self._drop_beyond_end(mid)
            raise NotFoundError(f"piece {index} of {mid.hex()[:16]}: its data file was truncated; dropped")
        if (self.verify_on_read if verify is None else verify) and b3(data) != m.pieces[index]:
            self._unmark(mid, [index])
            raise ArtifactError(f"piece {index} of {mid.hex()[:16]}: stored bytes are corrupt; dropped")
        return data

    def _read_bytes(self, mid: bytes, index: int, size: int, piece_size: int) -> bytearray:
        """The stored bytes (fewer if the file was cut); FileNotFoundError if its file is gone."""
        if self._legacy:  # a read-only open of a store still in the old layout
            h = self.get_manifest(mid).manifest.pieces[index].hex()
            with open(self.root / "pieces" / h[:2] / h, "rb") as f:
                data = bytearray(size)
                del data[f.readinto(data):]
            return data
        return self.files.read(mid, index * piece_size, size)

    def _read_present(self, mid: bytes, index: int, size: int, piece_size: int) -> bytearray:
        try:
            return self._read_bytes(mid, index, size, piece_size)
        except FileNotFoundError as exc:
            self._unmark(mid, self.index.present(mid))
            raise NotFoundError(f"piece {index} of {mid.hex()[:16]}: its data file was removed; "
                                "the artifact's pieces are dropped") from exc

    def piece_span(self, mid: bytes, index: int) -> tuple[Path, int, int]:
        """(data file, offset, size) of a present piece: what a zero-copy sender (os.sendfile) needs.
        The caller must still treat the bytes as unverified unless it checks them (the index says they
        were verified when written; a disk can rot since)."""
        size = self.index.present_size(mid, index)
        if size is None or self._legacy:
            raise NotFoundError(f"piece {index} of {mid.hex()[:16]} is not in the store")
        return self.files.path(mid), index * self.get_manifest(mid).manifest.piece_size, size

    def _unmark(self, mid: bytes, indices: Sequence[int] | set[int]) -> None:
        if self.read_only or not indices:  # reported by the caller; dropping it is left to a writable open
            return
        with self._sql("dropping pieces"):
            self.index.unmark(mid, indices)

    def _drop_beyond_end(self, mid: bytes) -> int:
        """Unmark the present pieces of `mid` that its data file no longer holds (file gone or cut)."""
        end = self.files.size(mid) or 0
        piece_size = self.get_manifest(mid).manifest.piece_size
        lost = [i for i, size, _ in self.index.present_rows(mid) if i * piece_size + size > end]
        self._unmark(mid, lost)
        return len(lost)

    def present_pieces(self, mid: bytes) -> set[int]:
        return self.index.present(mid)

    def missing_pieces(self, mid: bytes) -> list[int]:
        """Pieces still to fetch: a resumed fetch asks only for these."""
        n = self.index.n_pieces(mid)
        if n is None:
            raise NotFoundError(f"no manifest {mid.hex()} in the store")
        have = self.present_pieces(mid)
        return [i for i in range(n) if i not in have]

    # -- listing, use, pins, eviction -----------------------------------------------------------

    def entries(self, prefix: str = "") -> list[Entry]:
        """Stored artifacts, most recently used first; only ids starting with hex `prefix` if given."""
        prefix = prefix.lower()
        return [Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8]) for r in self.index.entry_rows()
                if r[0].hex().startswith(prefix)]

    def touch(self, mid: bytes) -> None:
        with self._sql("recording use"):
            self.index.touch(mid)

    def pin(self, mid: bytes, pinned: bool = True) -> None:
        with self._sql("pinning"):
            found = self.index.set_pinned(mid, pinned)
        if not found:
            raise NotFoundError(f"no manifest {mid.hex()} in the store")

    def usage(self) -> int:
        """Bytes of present pieces (what the data files hold; holes and manifests are not counted)."""
        return self.index.usage()

    def remove(self, mid: bytes) -> None:
        """Drop a manifest, its present marks, its data file and its manifest file (in that order: a
        crash in between leaves files the next open deletes, never an index entry without bytes)."""
        with self._sql("removing an artifact"):
            self.index.remove_manifest(mid)
        self._manifests.pop(mid, None)
        self.files.remove(mid)
        self._manifest_path(mid).unlink(missing_ok=True)

    def delete(self, mid: bytes, force: bool = False) -> None:
        """Remove one artifact on request (`kvnet rm`). A pinned one is kept unless `force`."""
        pinned = self.index.pinned(mid)
        if pinned is None:
            raise NotFoundError(f"no manifest {mid.hex()} in the store")
        if pinned and not force:
            raise PinnedError(f"{mid.hex()[:16]} is pinned; unpin it (`kvnet pin --off`) or use --force")
        self.remove(mid)

    def gc_candidates(self) -> list[GcItem]:
        """Unpinned artifacts that are partial or superseded: what `gc` removes.

        partial:    some of its pieces are missing (an interrupted or prefix-only fetch, or dropped pieces).
        superseded: another manifest in the store by the same publisher covers exactly the same tokens
                    (same model, block size, token count and last chain key), is complete, and is newer
                    (later `created`; ties broken by later arrival, then id). A publisher supersedes
                    its own manifest by publishing the same document again with --force (new terms,
                    title or expiry); the old one only takes space.
        Pinned artifacts are never candidates.
        """
        rows = self.index.gc_rows()
        present = {r[0]: self.index.present_bytes(r[0]) for r in rows}
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
            victim = self.index.lru_victim(protect)
            if victim is None:
                raise StoreFullError(
                    f"store capacity {self.capacity_bytes} B reached ({self.usage()} B used, "
                    f"{incoming} B more needed) and nothing unpinned is left to evict")
            self.remove(victim)

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, model_id: bytes, tokens: list[int]) -> Match | None:
        """The longest prefix of `tokens` whose KV the store can load now (all covering pieces present)."""
        if not tokens:
            return None
        best: Match | None = None
        for bs in self.index.block_sizes(model_id):
            for mid, n in self._matches(model_id, tokens, bs):
                if (best is None or n > best.n_tokens) and self._loadable(mid, n):
                    best = Match(mid, n)
        return best

    def _matches(self, model_id: bytes, tokens: list[int], bs: int) -> list[tuple[bytes, int]]:
        keys = chain.chain_keys(model_id, tokens, bs)
        by_key = {k.key: k.n_tokens for k in keys}
        hits = [(mid, n) for key, mid, n in self.index.chain_hits(list(by_key)) if by_key[key] == n]
        # A document's partial last block: test the prompt's own key over the same token count.
        matched_at: dict[bytes, int] = {}
        for mid, n in hits:
            matched_at[mid] = max(n, matched_at.get(mid, 0))
        for mid, n in self.index.tails(model_id, bs, len(tokens)):
            full = (n // bs) * bs
            if full and matched_at.get(mid) != full:
                continue
            if self.index.has_chain_key(chain.key_at(model_id, tokens, n, bs), mid):
                hits.append((mid, n))
        return hits

    def _loadable(self, mid: bytes, n_tokens: int) -> bool:
        m = self.get_manifest(mid).manifest
        have = self.present_pieces(mid)
        return all(i in have for i in m.pieces_for_tokens(n_tokens))

    # -- recovery and migration -----------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Make disk and index agree after a crash (or after files changed behind the store's back).
        Safe while other processes use the store. Runs on every writable open."""
        report = {"tmp_removed": self._remove_dead_tmp(), "manifests_adopted": self._adopt_manifests(),
                  "pieces_migrated": self._migrate_legacy(), "files_removed": 0, "pieces_dropped": 0}
        # Files first, then the index: a data file is only created once its manifest is indexed, so a
        # file listed before the index was read and missing from it is a leftover, never a new write.
        on_disk = self.files.ids()
        known = set(self.index.manifest_ids())
        for mid in on_disk:
            if mid not in known:  # removed from the index, but the process died before unlinking
                self.files.remove(mid)
                report["files_removed"] += 1
        for mid, end in self.index.present_ends().items():
            if (self.files.size(mid) or 0) < end:  # cut short or removed behind the store's back
                try:
                    report["pieces_dropped"] += self._drop_beyond_end(mid)
                except (StoreError, ManifestError):
                    continue  # an unreadable manifest: check() reports it
        return report

    def _remove_dead_tmp(self) -> int:
        n = 0
        for tmp in (self.root / "tmp").iterdir():
            pid = tmp.name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                n += 1
        return n

    def _adopt_manifests(self) -> int:
        """Index manifest files a crash left unindexed (written and renamed, not yet recorded)."""
        n = 0
        for path in (self.root / "manifests").glob("*.msgpack"):
            try:
                mid = bytes.fromhex(path.stem)
            except ValueError:
                continue
            if self.index.has_manifest(mid):
                continue
            try:
                sm = parse(path.read_bytes(), allow_expired=True)
            except ManifestError:
                path.unlink(missing_ok=True)
                continue
            if sm.id == mid:
                with self._sql("adopting a manifest"):
                    self.index.add_manifest(sm)
                n += 1
        return n

    def _migrate_legacy(self) -> int:
        """Convert the old layout (pieces/<ab>/<hash>, table `pieces`): each indexed old piece file is
        read, verified against its manifest's hash and written into the artifact's data file (groups of
        MIGRATE_GROUP, one fdatasync and one commit each); then the old table and files are dropped.
        A crash midway resumes on the next open (pieces already moved are skipped). Needs free space up
        to the old pieces' size while it runs; a full disk fails the open with StoreFullError, nothing lost."""
        legacy_dir = self.root / "pieces"
        if not self.index.has_legacy_pieces():
            if legacy_dir.exists():  # the old table was dropped, the files not yet
                shutil.rmtree(legacy_dir, ignore_errors=True)
            return 0
        moved = 0
        for mid in self.index.manifest_ids():
            try:
                self.get_manifest(mid)
            except (StoreError, ManifestError):
                continue
            have = self.index.present(mid)
            rows = [r for r in self.index.legacy_pieces(mid) if r[0] not in have]
            for start in range(0, len(rows), MIGRATE_GROUP):
                good = []
                for idx, h, size in rows[start:start + MIGRATE_GROUP]:
                    path = legacy_dir / h.hex()[:2] / h.hex()
                    data = path.read_bytes() if path.is_file() else b""
                    if len(data) == size and b3(data) == h:
                        good.append((idx, data))
                if good:
                    self._write_group(mid, good)
                    moved += len(good)
        with self._sql("finishing the layout migration"):
            self.index.drop_legacy()
        shutil.rmtree(legacy_dir, ignore_errors=True)
        return moved

    def check(self, deep: bool = True) -> list[str]:
        """Problems found (empty when consistent): present pieces missing or corrupt, manifests unreadable."""
        problems: list[str] = []
        for mid in self.index.manifest_ids():
            try:
                m = self.get_manifest(mid).manifest
            except (StoreError, ManifestError) as exc:
                problems.append(f"manifest {mid.hex()[:16]}: {exc}")
                continue
            problems += self._check_pieces(mid, m.piece_size, deep)
        return problems

    def _check_pieces(self, mid: bytes, piece_size: int, deep: bool) -> list[str]:
        """Present pieces of one artifact whose bytes are gone, cut short, or (deep) wrong."""
        out = []
        end = None if self._legacy else self.files.size(mid)
        for i, size, h in self.index.present_rows(mid):
            name = f"piece {i} of {mid.hex()[:16]}"
            if not self._legacy and (end is None or end < i * piece_size + size):
                why = "its data file is missing" if end is None else "it lies past the end of its data file"
                out.append(f"{name}: marked present but {why}")
                continue
            if not deep:
                continue
            try:
                data = self._read_bytes(mid, i, size, piece_size)
            except FileNotFoundError:
                out.append(f"{name}: marked present but its file is missing")
                continue
            if len(data) != size or b3(data) != h:
                out.append(f"{name}: bytes do not match their hash")
        return out
