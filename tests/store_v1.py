"""A writer of the store's first on-disk layout (v1, before data files), for the migration tests.

v1 kept each piece as its own file named by its BLAKE3 (`pieces/<ab>/<hash>`) and listed stored
pieces in a `pieces(hash, size)` table. This writes exactly that layout (v1's tables, and the rows and
files v1's `put_manifest` and `put_pieces` made), so that the tests exercise the
migration against real v1 stores without keeping the whole v1 store code around.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from kvnet.hashing import b3
from kvnet.manifest import parse
from kvnet.store_index import COMMON_TABLES, LEGACY_PIECES_TABLE

SCHEMA_V1 = COMMON_TABLES + LEGACY_PIECES_TABLE  # layout 2 kept layout 1's other tables unchanged


class Store:
    """`with Store(root) as s: s.put_manifest(raw); s.put_pieces(mid, [(i, bytes), ...])`, as v1 did."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("manifests", "pieces", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "index.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA_V1)
        self._manifests: dict[bytes, object] = {}

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def put_manifest(self, raw: bytes) -> None:
        sm = parse(raw)
        m, now = sm.manifest, time.time()
        (self.root / "manifests" / f"{sm.id.hex()}.msgpack").write_bytes(sm.raw)
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO manifests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)",
                            (sm.id, m.model_id, m.n_tokens, m.block_size, m.total_bytes, len(m.pieces),
                             m.source.get("title"), m.publisher, m.created, m.expires, now, now))
            self.db.executemany("INSERT OR IGNORE INTO chain VALUES (?,?,?)",
                                [(k, sm.id, m.boundary(i)) for i, k in enumerate(m.chain)])
            self.db.executemany("INSERT OR IGNORE INTO manifest_pieces VALUES (?,?,?,?)",
                                [(sm.id, i, h, m.piece_len(i)) for i, h in enumerate(m.pieces)])
        self._manifests[sm.id] = m

    def put_pieces(self, mid: bytes, items: list[tuple[int, bytes]]) -> None:
        m = self._manifests[mid]
        for index, data in items:
            h = m.pieces[index]
            assert b3(data) == h, "v1 stored only verified pieces"
            path = self.root / "pieces" / h.hex()[:2] / h.hex()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO pieces VALUES (?,?)", (h, len(data)))
