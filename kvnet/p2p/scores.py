"""Persistent peer scores: a peer that lies or stalls is scored down and avoided later.

Scores live in a small SQLite file in the node directory so they survive restarts. A score starts at
0, rises slowly with verified pieces and drops sharply on a bad piece, a wrong length or a timeout.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import trio

GOOD_PIECE = 0.1
MAX_SCORE = 10.0
# "overbilled": a host billed more than its offer's fee (kvnet.p2p.billing);
# "refused": a provider answered busy / rate_limited (loaded, not lying); "abuse": a peer this node
# refused for going over its serving limits (scored by the server, at most once per limit window);
# "over_limit": a peer whose stream this node reset at a connection or DHT cap (at most once per
# LIMIT_PENALTY_WINDOW_S: a flood of refused streams costs one disk write, not one per stream).
PENALTY = {"bad_piece": -10.0, "bad_length": -10.0, "timeout": -5.0, "protocol": -5.0, "unreachable": -2.0,
           "refused": -1.0, "abuse": -5.0, "over_limit": -1.0, "overbilled": -10.0,
           "phantom": -3.0}
AVOID_BELOW = -15.0
LIMIT_PENALTY_WINDOW_S = 60.0
"""A peer refused at a limit is scored down at most once per this many seconds (per reason)."""
PENALTY_TIMES_PRUNE_AT = 4096
"""Entries of the in-memory 'last penalised' table before expired ones are dropped."""


class PeerScores:
    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False,
                                  isolation_level=None, timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores(peer TEXT PRIMARY KEY, score REAL NOT NULL, "
                        "bad INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, last_reason TEXT)")
        self._penalized: dict[tuple[str, str], float] = {}  # (peer, reason) -> monotonic time of its last penalty
        self._writer = trio.CapacityLimiter(1)  # rate-limited penalties written off the event loop, one at a time

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

    def penalty_due(self, peer: str, reason: str, window_s: float = LIMIT_PENALTY_WINDOW_S) -> bool:
        """Whether `peer` may be scored down for `reason` now (not in the last `window_s` seconds); if
        so, the penalty is booked. In memory only: refusals in bulk never touch the disk to ask. The
        table is pruned of expired entries once it holds PENALTY_TIMES_PRUNE_AT, so it stays bounded
        by the peers refused within one window."""
        now = time.monotonic()
        last = self._penalized.get((peer, reason))
        if last is not None and now - last < window_s:
            return False
        if len(self._penalized) >= PENALTY_TIMES_PRUNE_AT:
            self._penalized = {k: t for k, t in self._penalized.items() if now - t < window_s}
        self._penalized[(peer, reason)] = now
        return True

    def bad_at_most_every(self, peer: str, reason: str, window_s: float = LIMIT_PENALTY_WINDOW_S) -> float | None:
        """`bad(peer, reason)`, at most once per `window_s` per peer and reason; None when skipped."""
        return self.bad(peer, reason) if self.penalty_due(peer, reason, window_s) else None

    async def over_limit(self, peer: str, window_s: float = LIMIT_PENALTY_WINDOW_S) -> None:
        """Score down (`over_limit`) a peer this node refused at a connection or DHT cap, at most once
        per `window_s`, writing in a worker thread so the refusal never waits on the disk on the
        event loop (the caller is the refused stream's own task, so no other peer waits either)."""
        if self.penalty_due(peer, "over_limit", window_s):
            await trio.to_thread.run_sync(self.bad, peer, "over_limit", limiter=self._writer)

    def avoided(self, peer: str) -> bool:
        return self.get(peer) < AVOID_BELOW

    def rank(self, peers: list[str]) -> list[str]:
        """Best first; peers below the avoid threshold go last (used only if nobody else has a piece)."""
        return sorted(peers, key=lambda p: -self.get(p))

    def close(self) -> None:
        self.db.close()
