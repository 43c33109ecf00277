"""The crash-safe payment ledger: one SQLite file (`<home>/ledger.sqlite`) per node.

It keeps the channels this node pays on (role `out`), is paid on (`in`) and holds for someone else
(`held`: license receipts a host keeps for a publisher), every receipt's raw bytes and lines, the
latest receipt per channel, and debtors. The formats and rules are kvnet.receipts' (docs/payments.md).

Durability is the point: SQLite runs in WAL mode with `synchronous=FULL`, and every receipt is
committed in one IMMEDIATE transaction before the call returns. So a payee has the receipt on disk
before it serves the credit the receipt buys, and a payer has recorded a receipt before it sends it:
a payer killed after sending never signs the same sequence twice (a restart continues after it).
A refused receipt changes nothing: the checks run inside the transaction, which is rolled back.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import identity, receipts
from kvnet.errors import KvnetError
from kvnet.receipts import Channel, Line, Receipt, ReceiptError, SignedReceipt
from kvnet.store_index import immediate

DAY = 86_400
# `Ledger.report()` of a node that has no ledger file yet (it has paid and been paid nothing)
EMPTY_REPORT: dict[str, list] = {"peers": [], "publishers": [], "manifests": [], "channels": [], "debtors": []}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS channels(
    id BLOB PRIMARY KEY, payer BLOB NOT NULL, payee BLOB NOT NULL, currency TEXT NOT NULL,
    nonce BLOB NOT NULL, role TEXT NOT NULL, via BLOB NOT NULL DEFAULT x'', opened REAL NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0, cumulative INTEGER NOT NULL DEFAULT 0, last_receipt BLOB);
CREATE INDEX IF NOT EXISTS channels_payer ON channels(payer, currency);
CREATE INDEX IF NOT EXISTS channels_payee ON channels(payee, currency);
CREATE TABLE IF NOT EXISTS receipts(
    id BLOB PRIMARY KEY, channel BLOB NOT NULL REFERENCES channels(id), seq INTEGER NOT NULL,
    cumulative INTEGER NOT NULL, added INTEGER NOT NULL, time INTEGER NOT NULL, recorded REAL NOT NULL,
    raw BLOB NOT NULL, UNIQUE(channel, seq));
CREATE TABLE IF NOT EXISTS lines(
    receipt BLOB NOT NULL REFERENCES receipts(id), idx INTEGER NOT NULL, manifest BLOB NOT NULL,
    kind TEXT NOT NULL, units INTEGER NOT NULL, amount INTEGER NOT NULL, PRIMARY KEY(receipt, idx));
CREATE INDEX IF NOT EXISTS lines_manifest ON lines(manifest);
CREATE TABLE IF NOT EXISTS debtors(
    peer BLOB NOT NULL, currency TEXT NOT NULL, owed INTEGER NOT NULL, since REAL NOT NULL,
    reason TEXT NOT NULL, PRIMARY KEY(peer, currency));
CREATE VIEW IF NOT EXISTS usage AS
    SELECT l.manifest AS manifest, c.role AS role, l.kind AS kind, c.currency AS currency,
           SUM(l.units) AS units, SUM(l.amount) AS amount, COUNT(*) AS n_lines
    FROM lines l JOIN receipts r ON r.id = l.receipt JOIN channels c ON c.id = r.channel
    GROUP BY l.manifest, c.role, l.kind, c.currency;
"""


class LedgerError(KvnetError):
    """The ledger file cannot be used (unreadable, another node's, or a call it cannot serve)."""


class SpendingLimitError(KvnetError):
    """A payment would exceed one of this node's spending limits; `limit` names which."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"spending limit {limit}: {message}")
        self.limit = limit


@dataclass(frozen=True)
class Latest:
    """A channel's state in this ledger."""

    channel: Channel
    role: str  # "out" (we pay), "in" (we are paid), "held" (kept for the payee)
    seq: int  # 0: no receipt yet
    cumulative: int
    receipt: Receipt | None


def credit_left(paid: int, served: int, window: int) -> int:
    """What a payee may still serve before it needs the next receipt: paid + window - served (micro-units).
    Zero or less: stop serving and wait for a receipt (or cut the payer off as a debtor)."""
    return paid + window - served


class Ledger:
    """A node's ledger. One connection; calls are serialized by a lock (network code may call from
    worker threads). `key` is needed to pay; the ledger remembers whose it is and refuses another key."""

    def __init__(self, path: Path, key: Ed25519PrivateKey | None = None, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.key = key
        self.read_only = read_only
        self._lock = threading.RLock()
        try:
            self.db = self._connect()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        self.me = self._owner(identity.public_bytes(key) if key is not None else None)

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = f"file:{self.path.resolve()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("SELECT COUNT(*) FROM channels").fetchone()
            return db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        return db

    def _owner(self, me: bytes | None) -> bytes | None:
        row = self.db.execute("SELECT value FROM meta WHERE name='owner'").fetchone()
        if row is not None:
            if me is not None and row[0] != me:
                raise LedgerError(f"{self.path} is the ledger of key {row[0].hex()[:16]}, not of this node's key")
            return row[0]
        if me is not None and not self.read_only:
            with self._write():
                self.db.execute("INSERT INTO meta VALUES ('owner', ?)", (me,))
        return me

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One IMMEDIATE transaction (one writer across processes); rolled back on any exception."""
        if self.read_only:
            raise LedgerError(f"{self.path} is open read-only")
        with self._lock, immediate(self.db):
            yield

    # -- state ------------------------------------------------------------------------------------

    def _role(self, ch: Channel) -> str:
        if self.me is not None and ch.payer == self.me:
            return "out"
        return "in" if self.me is not None and ch.payee == self.me else "held"

    def latest(self, channel_id: bytes) -> Latest | None:
        with self._lock:
            row = self.db.execute("SELECT c.payer, c.payee, c.currency, c.nonce, c.role, c.last_seq, c.cumulative, "
                                  "r.raw FROM channels c LEFT JOIN receipts r ON r.id = c.last_receipt "
                                  "WHERE c.id=?", (channel_id,)).fetchone()
        if row is None:
            return None
        ch = Channel(row[0], row[1], row[2], row[3])
        rec = receipts.parse_receipt(row[7]).receipt if row[7] is not None else None
        return Latest(ch, row[4], row[5], row[6], rec)

    def _latest_in_txn(self, channel_id: bytes) -> tuple[int, int, bytes | None]:
        """(seq, cumulative, receipt id) of the channel's latest receipt here; (0, 0, None) if none.
        Read from our own committed rows: no signature is verified twice."""
        row = self.db.execute("SELECT last_seq, cumulative, last_receipt FROM channels WHERE id=?",
                              (channel_id,)).fetchone()
        return (0, 0, None) if row is None else (row[0], row[1], row[2])

    def _record(self, sr: SignedReceipt, role: str, via: bytes = b"") -> None:
        """Insert a receipt (inside a transaction) and move its channel's latest to it."""
        r, ch = sr.receipt, sr.receipt.channel
        now = time.time()
        self.db.execute("INSERT OR IGNORE INTO channels(id, payer, payee, currency, nonce, role, via, opened) "
                        "VALUES (?,?,?,?,?,?,?,?)", (ch.id, ch.payer, ch.payee, ch.currency, ch.nonce, role, via, now))
        self.db.execute("INSERT INTO receipts VALUES (?,?,?,?,?,?,?,?)",
                        (sr.id, ch.id, r.seq, r.cumulative, r.added, r.time, now, sr.raw))
        self.db.executemany("INSERT INTO lines VALUES (?,?,?,?,?,?)",
                            [(sr.id, i, ln.manifest, ln.kind, ln.units, ln.amount) for i, ln in enumerate(r.lines)])
        self.db.execute("UPDATE channels SET last_seq=?, cumulative=?, last_receipt=? WHERE id=?",
                        (r.seq, r.cumulative, sr.id, ch.id))

    # -- the payee's side ---------------------------------------------------------------------------

    def accept(self, raw: bytes, expect_payee: bytes, *, expect_payer: bytes | None = None,
               expect_channel: bytes | None = None, expect_currency: str | None = None) -> SignedReceipt:
        """Verify `raw` against its channel's latest receipt here and store it durably, in one transaction.

        `expect_payee` is our key (hosting) or the manifest's publisher (a license receipt a host keeps);
        `expect_payer` the key of the peer that sent it, `expect_channel` the channel this exchange runs
        on, `expect_currency` the offer's. Any broken rule raises ReceiptError and records nothing."""
        sr = receipts.parse_receipt(raw)
        ch = sr.receipt.channel
        _check(ch.payee == expect_payee, "wrong_payee", f"made out to {ch.payee.hex()[:16]}, "
               f"expected {expect_payee.hex()[:16]}")
        _check(expect_payer is None or ch.payer == expect_payer, "wrong_payer",
               "signed by a key other than the sending peer's")
        _check(ch.payer != self.me, "wrong_payer", "a receipt we signed ourselves is not a payment to us")
        _check(expect_channel is None or sr.channel_id == expect_channel, "wrong_channel",
               "the receipt is for another channel")
        _check(expect_currency is None or ch.currency == expect_currency, "wrong_currency",
               f"currency {ch.currency!r}, expected {expect_currency!r}")
        with self._write():
            if self.db.execute("SELECT 1 FROM receipts WHERE id=?", (sr.id,)).fetchone() is not None:
                raise ReceiptError("replayed", f"receipt seq {sr.receipt.seq} was already accepted")
            receipts.check_next(*self._latest_in_txn(sr.channel_id), sr)
            self._record(sr, self._role(ch))
            self._settle_debt(ch.payer, ch.currency)
        return sr

    def paid_by(self, payer: bytes, currency: str, payee: bytes | None = None) -> int:
        """The sum of the latest cumulative amounts of `payer`'s channels to `payee` (default: us)."""
        payee = self.me if payee is None else payee
        with self._lock:
            row = self.db.execute("SELECT COALESCE(SUM(cumulative), 0) FROM channels WHERE payer=? AND payee=? "
                                  "AND currency=?", (payer, payee, currency)).fetchone()
        return int(row[0])

    def credit_left(self, payer: bytes, currency: str, served: int, window: int) -> int:
        """What we may still serve `payer` (see `credit_left`), `served` being the value delivered so far."""
        return credit_left(self.paid_by(payer, currency), served, window)

    # -- debtors -----------------------------------------------------------------------------------

    def mark_debtor(self, peer: bytes, currency: str, owed: int, reason: str) -> None:
        """Record a payer cut off at the credit window: refused until its receipts cover `owed`."""
        with self._write():
            self.db.execute("INSERT INTO debtors VALUES (?,?,?,?,?) ON CONFLICT(peer, currency) DO UPDATE SET "
                            "owed=MAX(owed, excluded.owed), reason=excluded.reason",
                            (peer, currency, owed, time.time(), reason))

    def is_debtor(self, peer: bytes) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM debtors WHERE peer=?", (peer,)).fetchone() is not None

    def debtors(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT peer, currency, owed, since, reason FROM debtors ORDER BY since").fetchall()
        return [{"peer": r[0], "currency": r[1], "owed": r[2], "since": r[3], "reason": r[4]} for r in rows]

    def _settle_debt(self, payer: bytes, currency: str) -> None:
        """Inside accept's transaction: a debtor whose receipts now cover what it owed is cleared."""
        row = self.db.execute("SELECT owed FROM debtors WHERE peer=? AND currency=?", (payer, currency)).fetchone()
        if row is None or self.me is None:
            return
        paid = self.db.execute("SELECT COALESCE(SUM(cumulative), 0) FROM channels WHERE payer=? AND payee=? AND "
                               "currency=?", (payer, self.me, currency)).fetchone()[0]
        if paid >= row[0]:
            self.db.execute("DELETE FROM debtors WHERE peer=? AND currency=?", (payer, currency))

    # -- the payer's side --------------------------------------------------------------------------

    def open_channel(self, payee: bytes, currency: str, via: bytes = b"") -> Channel:
        """Our channel to `payee` in `currency` (created durably with a fresh nonce on first use).
        `via` keeps several apart locally: a license channel per host that will hold its receipts."""
        if self.key is None or self.me is None:
            raise LedgerError("paying needs this node's key")
        with self._write():
            row = self.db.execute("SELECT payer, payee, currency, nonce FROM channels WHERE role='out' AND payee=? "
                                  "AND currency=? AND via=?", (payee, currency, via)).fetchone()
            if row is not None:
                return Channel(*row)
            ch = Channel.new(self.me, payee, currency)
            self.db.execute("INSERT INTO channels(id, payer, payee, currency, nonce, role, via, opened) "
                            "VALUES (?,?,?,?,?,'out',?,?)", (ch.id, ch.payer, ch.payee, ch.currency, ch.nonce, via,
                                                             time.time()))
        return ch

    def pay(self, channel: Channel, lines: Sequence[Line], when: int | None = None) -> SignedReceipt:
        """Sign the channel's next receipt (seq last+1, cumulative last + lines) and commit it before
        returning: the caller sends it only after it is durable."""
        if self.key is None or channel.payer != self.me:
            raise LedgerError("only the channel's payer, with its key, can pay on it")
        with self._write():
            row = self.db.execute("SELECT last_seq, cumulative FROM channels WHERE id=? AND role='out'",
                                  (channel.id,)).fetchone()
            if row is None:
                raise LedgerError("unknown channel: open it with open_channel first")
            total = row[1] + sum(ln.amount for ln in lines)
            sr = receipts.sign_receipt(self.key, channel, row[0] + 1, total, lines, when)
            self._record(sr, "out")
        return sr

    def receipts_after(self, channel_id: bytes, seq: int) -> list[bytes]:
        """The raw receipts of a channel with a sequence above `seq`, in order: what a payer resends to
        a payee whose latest is `seq` (after a crash between recording and sending)."""
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT raw FROM receipts WHERE channel=? AND seq>? ORDER BY seq",
                                                  (channel_id, seq))]

    def held_for(self, payee: bytes, after: int, limit: int) -> list[tuple[int, bytes]]:
        """(cursor, raw) of the receipts held for `payee` (license receipts kept for a publisher), in the
        order they were accepted (so each channel's in sequence), after cursor `after` (0: from the
        start): what `/kvnet/receipts/1.0.0` hands the publisher page by page."""
        with self._lock:
            return [(r[0], r[1]) for r in self.db.execute(
                "SELECT r.rowid, r.raw FROM receipts r JOIN channels c ON c.id = r.channel WHERE c.role='held' "
                "AND c.payee=? AND r.rowid>? ORDER BY r.rowid LIMIT ?", (payee, after, limit))]

    def spent(self, since: float, payee: bytes | None = None, currency: str | None = None) -> int:
        """What we signed for (receipt lines) since `since` (unix seconds of the receipts' time)."""
        sql = "SELECT COALESCE(SUM(r.added), 0) FROM receipts r JOIN channels c ON c.id = r.channel " \
              "WHERE c.role='out' AND r.time >= ?"
        args: list[Any] = [int(since)]
        if payee is not None:
            sql, args = sql + " AND c.payee=?", [*args, payee]
        if currency is not None:
            sql, args = sql + " AND c.currency=?", [*args, currency]
        with self._lock:
            return int(self.db.execute(sql, args).fetchone()[0])

    # -- reports and settlement ---------------------------------------------------------------------

    def balances(self) -> dict[str, list[dict[str, Any]]]:
        """Totals per peer (paid to, received from, held for), per publisher (license lines, by the
        payee they are made out to) and per manifest (bytes, loads, amounts by role)."""
        with self._lock:
            peers = self.db.execute(
                "SELECT CASE role WHEN 'out' THEN payee ELSE payer END, role, currency, COUNT(*), SUM(last_seq), "
                "SUM(cumulative) FROM channels GROUP BY 1, role, currency ORDER BY 1, role").fetchall()
            pubs = self.db.execute(
                "SELECT c.payee, c.role, c.currency, SUM(l.units), SUM(l.amount) FROM lines l "
                "JOIN receipts r ON r.id=l.receipt JOIN channels c ON c.id=r.channel WHERE l.kind='license' "
                "GROUP BY c.payee, c.role, c.currency ORDER BY c.payee").fetchall()
            usage = self.db.execute("SELECT manifest, role, kind, currency, units, amount, n_lines FROM usage "
                                    "ORDER BY manifest, role, kind").fetchall()
        debtors = {d["peer"] for d in self.debtors()}
        return {
            "peers": [{"peer": p.hex(), "role": role, "currency": cur, "channels": n, "receipts": seqs,
                       "amount": amt, "debtor": p in debtors} for p, role, cur, n, seqs, amt in peers],
            "publishers": [{"publisher": p.hex(), "role": role, "currency": cur, "loads": loads, "amount": amt}
                           for p, role, cur, loads, amt in pubs],
            "manifests": [{"manifest": m.hex(), "role": role, "kind": kind, "currency": cur, "units": units,
                           "amount": amt, "lines": n} for m, role, kind, cur, units, amt, n in usage],
        }

    def channels(self) -> list[dict[str, Any]]:
        """Every channel with its latest receipt (seq 0: none yet): what a payer and its payee compare,
        channel by channel, to see that both ledgers agree (the channel id is the same in both)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT c.id, c.role, c.payer, c.payee, c.currency, c.last_seq, c.cumulative, r.time, r.id "
                "FROM channels c LEFT JOIN receipts r ON r.id = c.last_receipt ORDER BY c.role, c.id").fetchall()
        return [{"channel": cid.hex(), "role": role, "payer": payer.hex(), "payee": payee.hex(), "currency": cur,
                 "seq": seq, "cumulative": cum, "time": t, "receipt": rid.hex() if rid else None}
                for cid, role, payer, payee, cur, seq, cum, t, rid in rows]

    def report(self) -> dict[str, Any]:
        """The whole picture as plain JSON values (hex for bytes): `balances()` (peers, publishers,
        manifests), `channels()` and debtors. The one source of `kvnet ledger --json` and of a
        kvnet-node's `GET /v1/ledger` (docs/agent-api.md)."""
        debtors = [{**d, "peer": d["peer"].hex()} for d in self.debtors()]
        return {**self.balances(), "channels": self.channels(), "debtors": debtors}

    def mark(self) -> int:
        """A position in the ledger: receipts recorded after this call have a larger rowid (`signed_since`)."""
        with self._lock:
            return int(self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM receipts").fetchone()[0])

    def signed_since(self, mark: int, manifest: bytes) -> dict[str, int]:
        """Per currency, what we signed for `manifest` (hosting and license lines of our own receipts)
        after `mark`: the price actually paid for one fetch of it."""
        with self._lock:
            rows = self.db.execute(
                "SELECT c.currency, SUM(l.amount) FROM lines l JOIN receipts r ON r.id = l.receipt "
                "JOIN channels c ON c.id = r.channel WHERE c.role='out' AND r.rowid > ? AND l.manifest = ? "
                "GROUP BY c.currency", (mark, manifest)).fetchall()
        return {cur: int(amount) for cur, amount in rows}

    def totals(self) -> list[dict[str, Any]]:
        """Receipts and their added amounts per role and currency (`out`: signed by us, `in`: accepted
        as payee, `held`: accepted for a publisher): what the node's metrics count."""
        with self._lock:
            rows = self.db.execute("SELECT c.role, c.currency, COUNT(*), COALESCE(SUM(r.added), 0) FROM receipts r "
                                   "JOIN channels c ON c.id = r.channel GROUP BY c.role, c.currency").fetchall()
        return [{"role": role, "currency": cur, "receipts": n, "amount": int(amt)} for role, cur, n, amt in rows]

    def export(self, since: int | None = None, role: str = "in") -> bytes:
        """A settlement batch (docs/payments.md) of the channels we are paid on (`in`) or hold (`held`):
        each channel's receipts in order up to its latest. With `since` (unix seconds): only channels
        with a receipt timed at or after it, from the receipt just before the first such one (the anchor)."""
        if role not in ("in", "held"):
            raise LedgerError("export role is 'in' or 'held'")
        with self._lock:
            chans = [r[0] for r in self.db.execute("SELECT id FROM channels WHERE role=? AND last_seq>0 ORDER BY id",
                                                   (role,))]
            lists = []
            for cid in chans:
                start = 1
                if since is not None:
                    row = self.db.execute("SELECT MIN(seq) FROM receipts WHERE channel=? AND time>=?",
                                          (cid, since)).fetchone()
                    if row[0] is None:
                        continue
                    start = max(1, row[0] - 1)
                lists.append([r[0] for r in self.db.execute("SELECT raw FROM receipts WHERE channel=? AND seq>=? "
                                                            "ORDER BY seq", (cid, start))])
        payee = self.me if role == "in" else None
        return receipts.encode_batch(payee, int(time.time()), lists)


def _check(cond: bool, rule: str, message: str) -> None:
    if not cond:
        raise ReceiptError(rule, message)


# -- spending limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """What a fetch would pay one payee: its total, and the unit prices the limits cap."""

    total: int
    currency: str = "USD"
    price_per_load: int = 0
    fee_per_mib: int = 0


@dataclass(frozen=True)
class SpendingLimits:
    """The most this node pays, in integer micro-units of `currency`; None means no limit. Checked
    before any byte moves; a cost in another currency is refused (limit `currency`)."""

    currency: str = "USD"
    per_load: int | None = None  # a manifest's license price per load
    per_mib: int | None = None  # a host's hosting fee per MiB
    per_peer_per_day: int | None = None  # paid to one payee in the last 24 h, this cost included
    total_per_day: int | None = None  # paid to everyone in the last 24 h, this cost included

    def check(self, ledger: Ledger, peer: bytes, cost: Cost, now: float | None = None) -> None:
        """Raise SpendingLimitError naming the first limit `cost` (to `peer`) would exceed."""
        now = time.time() if now is None else now
        if cost.total == 0 and cost.price_per_load == 0 and cost.fee_per_mib == 0:
            return
        if cost.currency != self.currency:
            raise SpendingLimitError("currency", f"priced in {cost.currency!r}; this node pays in {self.currency!r}")
        _limit("per_load", self.per_load, cost.price_per_load, "license price per load")
        _limit("per_mib", self.per_mib, cost.fee_per_mib, "hosting fee per MiB")
        if self.per_peer_per_day is not None:
            spent = ledger.spent(now - DAY, payee=peer, currency=self.currency)
            _limit("per_peer_per_day", self.per_peer_per_day, spent + cost.total,
                   f"paid to {peer.hex()[:16]} in 24 h with this fetch ({spent} before)")
        if self.total_per_day is not None:
            spent = ledger.spent(now - DAY, currency=self.currency)
            _limit("total_per_day", self.total_per_day, spent + cost.total,
                   f"paid in 24 h with this fetch ({spent} before)")


def _limit(name: str, limit: int | None, value: int, what: str) -> None:
    if limit is not None and value > limit:
        raise SpendingLimitError(name, f"{what} would be {value}, the limit is {limit}")
