"""Persistent peer scores: a peer that lies or stalls is scored down and avoided later.

Scores live in a small SQLite file in the node directory so they survive restarts. A score starts at
0, rises slowly with verified pieces and drops sharply on a bad piece, a wrong length or a timeout.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

GOOD_PIECE = 0.1
MAX_SCORE = 10.0
# "refused": a provider answered busy / rate_limited (loaded, not lying); "abuse": a peer this node
# refused for going over its serving limits (scored by the server, at most once per limit window).
PENALTY = {"bad_piece": -10.0, "bad_length": -10.0, "timeout": -5.0, "protocol": -5.0, "unreachable": -2.0,
           "refused": -1.0, "abuse": -5.0}
AVOID_BELOW = -15.0


class PeerScores:
    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False,
                                  isolation_level=None, timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores(peer TEXT PRIMARY KEY, score REAL NOT NULL, "
                        "bad INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, last_reason TEXT)")

    def get(self, peer: str) -> float:
        with self._lock:
            row = self.db.execute("SELECT score FROM scores WHERE peer=?", (peer,)).fetchone()
        return row[0] if row else 0.0

    def _add(self, peer: str, delta: float, reason: str | None) -> float:
        with self._lock:
            row = self.db.execute("SELECT score, bad FROM scores WHERE peer=?", (peer,)).fetchone()
            score, bad = row if row else (0.0, 0)
            score = min(MAX_SCORE, score + delta)
            bad += 1 if delta < 0 else 0
            self.db.execute("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?)",
                            (peer, score, bad, time.time(), reason))
        return score

    def good(self, peer: str, pieces: int = 1) -> float:
        return self._add(peer, GOOD_PIECE * pieces, None)

    def bad(self, peer: str, reason: str) -> float:
        return self._add(peer, PENALTY.get(reason, -5.0), reason)

    def avoided(self, peer: str) -> bool:
        return self.get(peer) < AVOID_BELOW

    def rank(self, peers: list[str]) -> list[str]:
        """Best first; peers below the avoid threshold go last (used only if nobody else has a piece)."""
        return sorted(peers, key=lambda p: -self.get(p))

    def close(self) -> None:
        self.db.close()
