"""Signed payment receipts and settlement batches (specified in docs/payments.md).

A channel is one ordered (payer, payee, currency) with a nonce the payer chose; its id is
BLAKE3(canonical(channel map)). A receipt is the payer's signed promise: "on this channel I owe you
`cumulative` micro-units in total, `lines` of which are new since my previous receipt". Amounts are
cumulative (as Swarm cheques and Filecoin vouchers), so settling the latest receipt of a channel
settles everything before it, and losing an old receipt loses nothing.

signed bytes = canonical({...body, "sig": Ed25519(SIG_DOMAIN || canonical(body))}); receipt id =
BLAKE3(signed bytes). `parse_receipt` checks what one receipt alone can prove (size, encoding, fields,
channel id, signature, that the lines are well formed); the rules that need the previous receipt
(sequence exactly +1, cumulative = previous + lines) are the ledger's (kvnet.ledger) and
`verify_batch`'s. Every refusal is one `ReceiptError` whose `rule` names the rule broken.

This module is pure: no files, no clock unless asked, no network, no torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, identity
from kvnet.errors import InputError, KvnetError
from kvnet.hashing import b3

FORMAT_VERSION = 1
CHANNEL_DOMAIN = "kvnet/channel/v1"
SIG_DOMAIN = b"kvnet/receipt/v1\x00"
BATCH_DOMAIN = "kvnet/settlement-batch/v1"
MAX_RECEIPT_BYTES = 8192  # 64 lines of ~90 bytes plus the header fit with room to spare
MAX_LINES = 64
MAX_CURRENCY_BYTES = 16  # the manifest's limit (UTF-8 bytes)
NONCE_BYTES = 16
MAX_AMOUNT = 2**63 - 1  # every amount, cumulative included, fits a signed 64-bit integer (SQLite's)
MAX_BATCH_BYTES = 64 << 20
MIB = 1 << 20
KINDS = {"hosting": "bytes", "license": "loads"}  # line kind -> the unit it counts

RULES = (
    "oversized", "malformed", "non_canonical", "unsupported_version", "wrong_channel", "bad_signature",
    "wrong_payee", "wrong_payer", "wrong_currency", "replayed", "repeated_sequence", "skipped_sequence",
    "lower_cumulative", "lines_do_not_add_up", "bad_batch", "wrong_amount",
)


class ReceiptError(KvnetError, ValueError):
    """A receipt (or a batch of them) breaks a rule of docs/payments.md; `rule` names which."""

    def __init__(self, rule: str, message: str, what: str = "receipt") -> None:
        assert rule in RULES, rule
        super().__init__(f"{what} refused ({rule}): {message}")
        self.rule = rule


def _need(cond: bool, rule: str, message: str) -> None:
    if not cond:
        raise ReceiptError(rule, message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- channels ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Channel:
    """One direction of payment between two keys in one currency; `nonce` tells several apart."""

    payer: bytes
    payee: bytes
    currency: str
    nonce: bytes

    @classmethod
    def new(cls, payer: bytes, payee: bytes, currency: str) -> Channel:
        """A fresh channel with a random nonce (a payer that lost its ledger starts a new one)."""
        ch = cls(payer, payee, currency, os.urandom(NONCE_BYTES))
        _check_channel_fields(ch.to_map())
        return ch

    def to_map(self) -> dict[str, Any]:
        return {"domain": CHANNEL_DOMAIN, "payer": self.payer, "payee": self.payee, "currency": self.currency,
                "nonce": self.nonce}

    @property
    def id(self) -> bytes:
        return b3(canonical.encode(self.to_map()))


def _check_channel_fields(d: dict[str, Any]) -> None:
    _need(isinstance(d["payer"], bytes) and len(d["payer"]) == 32, "malformed", "payer must be a 32-byte key")
    _need(isinstance(d["payee"], bytes) and len(d["payee"]) == 32, "malformed", "payee must be a 32-byte key")
    _need(d["payer"] != d["payee"], "malformed", "payer and payee must differ")
    cur = d["currency"]
    _need(isinstance(cur, str) and 0 < len(cur.encode()) <= MAX_CURRENCY_BYTES, "malformed",
          f"currency must be 1..{MAX_CURRENCY_BYTES} bytes of UTF-8")
    _need(isinstance(d["nonce"], bytes) and len(d["nonce"]) == NONCE_BYTES, "malformed",
          f"nonce must be {NONCE_BYTES} bytes")


# -- receipts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One charge: `units` bytes (hosting) or loads (license) of one manifest, for `amount`."""

    manifest: bytes
    kind: str  # "hosting" or "license"
    units: int
    amount: int

    def to_map(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "kind": self.kind, KINDS.get(self.kind, "units"): self.units,
                "amount": self.amount}


@dataclass(frozen=True)
class Receipt:
    channel: Channel
    seq: int
    cumulative: int
    lines: tuple[Line, ...]
    time: int
    version: int = FORMAT_VERSION

    @property
    def added(self) -> int:
        """What this receipt adds to the previous one's cumulative amount."""
        return sum(line.amount for line in self.lines)

    def body(self) -> dict[str, Any]:
        ch = self.channel
        return {"v": self.version, "channel": ch.id, "payer": ch.payer, "payee": ch.payee,
                "currency": ch.currency, "nonce": ch.nonce, "seq": self.seq, "cumulative": self.cumulative,
                "lines": [line.to_map() for line in self.lines], "time": self.time}


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    raw: bytes  # the signed canonical bytes: what travels and what is stored
    id: bytes  # BLAKE3(raw)

    @property
    def channel_id(self) -> bytes:
        return self.receipt.channel.id


_FIELDS: dict[str, type] = {"v": int, "channel": bytes, "payer": bytes, "payee": bytes, "currency": str,
                            "nonce": bytes, "seq": int, "cumulative": int, "lines": list, "time": int,
                            "sig": bytes}


def _check_line(i: int, d: Any) -> Line:
    _need(isinstance(d, dict), "malformed", f"line {i} must be a map")
    kind = d.get("kind")
    _need(kind in KINDS, "malformed", f"line {i}: kind must be one of {sorted(KINDS)}")
    unit = KINDS[kind]
    _need(set(d) == {"manifest", "kind", unit, "amount"}, "malformed",
          f"line {i}: a {kind} line has exactly manifest, kind, {unit}, amount")
    _need(isinstance(d["manifest"], bytes) and len(d["manifest"]) == 32, "malformed",
          f"line {i}: manifest must be a 32-byte id")
    _need(_is_int(d[unit]) and 0 < d[unit] <= MAX_AMOUNT, "malformed", f"line {i}: {unit} must be an int >= 1")
    _need(_is_int(d["amount"]) and 0 <= d["amount"] <= MAX_AMOUNT, "malformed",
          f"line {i}: amount must be an int in 0..2^63-1")
    return Line(d["manifest"], kind, d[unit], d["amount"])


def _validate_shape(r: Receipt) -> None:
    """Version, channel fields, ranges and lines: the `malformed` rules (docs/payments.md)."""
    _need(r.version == FORMAT_VERSION, "unsupported_version", f"format version {r.version}, expected 1")
    _check_channel_fields(r.channel.to_map())
    _need(_is_int(r.seq) and 1 <= r.seq <= MAX_AMOUNT, "malformed", "seq must be an int >= 1")
    _need(_is_int(r.cumulative) and 0 <= r.cumulative <= MAX_AMOUNT, "malformed",
          "cumulative must be an int in 0..2^63-1")
    _need(_is_int(r.time) and 0 <= r.time <= MAX_AMOUNT, "malformed", "time must be an int >= 0")
    _need(0 < len(r.lines) <= MAX_LINES, "malformed", f"a receipt has 1..{MAX_LINES} lines")
    for i, line in enumerate(r.lines):
        _check_line(i, line.to_map())


def _validate_sums(r: Receipt) -> None:
    """What the lines of one receipt must add up to, without its predecessor."""
    _need(r.added <= r.cumulative, "lines_do_not_add_up",
          f"lines add {r.added}, more than the cumulative amount {r.cumulative}")
    _need(r.seq != 1 or r.added == r.cumulative, "lines_do_not_add_up",
          f"the first receipt's lines add {r.added}, cumulative says {r.cumulative}")


def sign_receipt(key: Ed25519PrivateKey, channel: Channel, seq: int, cumulative: int, lines: Sequence[Line],
                 when: int | None = None) -> SignedReceipt:
    """Sign a receipt as `channel`'s payer. Checks the receipt's own rules, not the channel's history:
    that is the ledger's job (`Ledger.pay` picks seq and cumulative)."""
    _need(identity.public_bytes(key) == channel.payer, "bad_signature", "the signing key is not the channel's payer")
    r = Receipt(channel, seq, cumulative, tuple(lines), int(time.time()) if when is None else when)
    _validate_shape(r)
    _validate_sums(r)
    body = canonical.encode(r.body())
    raw = canonical.encode({**r.body(), "sig": key.sign(SIG_DOMAIN + body)})
    _need(len(raw) <= MAX_RECEIPT_BYTES, "oversized", f"receipt is {len(raw)} bytes, limit {MAX_RECEIPT_BYTES}")
    return SignedReceipt(r, raw, b3(raw))


def _decode(raw: bytes, limit: int, what: str) -> Any:
    """Canonical decode that tells `malformed` (not msgpack at all) from `non_canonical`."""
    try:
        return canonical.decode(raw, limit)
    except canonical.CanonicalError as exc:
        try:
            msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several unrelated types
            raise ReceiptError("malformed", f"{what} is not msgpack: {exc}") from exc
        raise ReceiptError("non_canonical", f"{what} encoding: {exc}") from exc


def parse_receipt(raw: bytes) -> SignedReceipt:
    """Decode and verify one receipt's bytes: size, canonical encoding, fields, channel id, the payer's
    signature, well-formed lines. Raises ReceiptError naming the rule."""
    _need(isinstance(raw, bytes), "malformed", "a receipt is a byte string")
    _need(len(raw) <= MAX_RECEIPT_BYTES, "oversized", f"receipt is {len(raw)} bytes, limit {MAX_RECEIPT_BYTES}")
    d = _decode(raw, MAX_RECEIPT_BYTES, "receipt")
    _need(isinstance(d, dict), "malformed", "a receipt is a map")
    _need(set(d) == set(_FIELDS), "malformed",
          f"receipt fields: missing {sorted(set(_FIELDS) - set(d))}, unknown {sorted(set(d) - set(_FIELDS))}")
    for name, typ in _FIELDS.items():
        _need(isinstance(d[name], typ) and not (typ is int and isinstance(d[name], bool)), "malformed",
              f"field {name}: expected {typ.__name__}, got {type(d[name]).__name__}")
    _need(d["v"] == FORMAT_VERSION, "unsupported_version", f"format version {d['v']}, expected 1")
    _check_channel_fields(d)
    channel = Channel(d["payer"], d["payee"], d["currency"], d["nonce"])
    _need(0 < len(d["lines"]) <= MAX_LINES, "malformed", f"a receipt has 1..{MAX_LINES} lines")
    lines = tuple(_check_line(i, x) for i, x in enumerate(d["lines"]))
    r = Receipt(channel, d["seq"], d["cumulative"], lines, d["time"], d["v"])
    _validate_shape(r)
    _need(channel.id == d["channel"], "wrong_channel",
          "channel id is not BLAKE3 of the channel map (payer, payee, currency, nonce)")
    _need(identity.verify(channel.payer, d["sig"], SIG_DOMAIN + canonical.encode(r.body())), "bad_signature",
          "signature does not verify against the payer key")
    _validate_sums(r)
    return SignedReceipt(r, raw, b3(raw))


def check_next(prev_seq: int, prev_cumulative: int, prev_id: bytes | None, sr: SignedReceipt) -> None:
    """The rules between a channel's latest receipt (its seq, cumulative and id; seq 0: none yet) and the
    next one, `sr`. Shared by the ledger and `verify_batch`, so both refuse exactly the same sequences."""
    r = sr.receipt
    if prev_seq == 0:
        _need(r.seq == 1, "skipped_sequence", f"the channel's first receipt must have seq 1, got {r.seq}")
        return  # seq 1: lines == cumulative was checked by parse_receipt
    _need(sr.id != prev_id, "replayed", f"this receipt (seq {r.seq}) was already accepted")
    _need(r.seq != prev_seq, "repeated_sequence", f"seq {r.seq} is already used by another receipt")
    _need(r.seq > prev_seq, "repeated_sequence", f"seq {r.seq} is below the channel's latest, {prev_seq}")
    _need(r.seq == prev_seq + 1, "skipped_sequence", f"seq {r.seq} after {prev_seq}: expected {prev_seq + 1}")
    _need(r.cumulative >= prev_cumulative, "lower_cumulative",
          f"cumulative {r.cumulative} is below the previous {prev_cumulative}")
    _need(r.cumulative == prev_cumulative + r.added, "lines_do_not_add_up",
          f"previous {prev_cumulative} + lines {r.added} != cumulative {r.cumulative}")


# -- prices --------------------------------------------------------------------------------------


def hosting_cost(n_bytes: int, fee_per_mib: int) -> int:
    """Hosting charge for `n_bytes` at `fee_per_mib` micro-units per MiB (2^20 bytes), rounded UP to
    the next micro-unit: ceil(n_bytes * fee_per_mib / 2^20). Integer arithmetic, the same everywhere."""
    if n_bytes < 0 or fee_per_mib < 0:
        raise InputError(f"hosting cost of {n_bytes} bytes at {fee_per_mib}/MiB: both must be >= 0")
    return (n_bytes * fee_per_mib + MIB - 1) // MIB


def license_cost(loads: int, price_per_load: int) -> int:
    """License charge for `loads` loads at the manifest's `price_per_load`."""
    if loads < 0 or price_per_load < 0:
        raise InputError(f"license cost of {loads} loads at {price_per_load}: both must be >= 0")
    return loads * price_per_load


# -- settlement batches --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelTotal:
    """One channel of a verified batch: who owes whom how much, and from which receipt on."""

    channel: Channel
    first_seq: int
    latest_seq: int
    from_cumulative: int  # the cumulative before the batch's lines (0 when it starts at seq 1)
    cumulative: int  # the latest receipt's: what a settlement service redeems
    latest: bytes  # the latest receipt's raw bytes


@dataclass
class BatchSummary:
    payee: bytes | None
    created: int
    channels: list[ChannelTotal] = field(default_factory=list)

    def owed(self) -> dict[tuple[bytes, str], int]:
        """(payer, currency) -> the sum of the latest cumulative amounts of its channels."""
        out: dict[tuple[bytes, str], int] = {}
        for c in self.channels:
            k = (c.channel.payer, c.channel.currency)
            out[k] = out.get(k, 0) + c.cumulative
        return out


def encode_batch(payee: bytes | None, created: int, channels: Iterable[Sequence[bytes]]) -> bytes:
    """A settlement batch: per channel, its receipts' raw bytes in sequence order, ending at its latest.
    `payee` None means a batch of mixed payees (e.g. license receipts a host keeps for publishers)."""
    lists = [list(rs) for rs in channels]
    lists.sort(key=lambda rs: parse_receipt(rs[0]).channel_id)
    return canonical.encode({"domain": BATCH_DOMAIN, "v": FORMAT_VERSION, "payee": payee, "created": created,
                             "channels": lists})


def verify_batch(raw: bytes, payee: bytes | None = None) -> BatchSummary:
    """See `_verify_batch`; every refusal reads "batch refused (rule): ..."."""
    try:
        return _verify_batch(raw, payee)
    except ReceiptError as exc:
        if str(exc).startswith("batch"):
            raise
        raise ReceiptError(exc.rule, str(exc).split(": ", 1)[1], "batch") from exc


def _verify_batch(raw: bytes, payee: bytes | None) -> BatchSummary:
    """Check a settlement batch offline, with no node and no store: every receipt's signature, channel
    ids, strictly consecutive sequences, lines that add up to the cumulative amounts, the payee's key.
    A channel's list may start above seq 1 (an export --since): then its first receipt is the anchor,
    trusted for its own cumulative only. Returns the totals per channel; `.owed()` per payer."""
    _need(len(raw) <= MAX_BATCH_BYTES, "oversized", f"batch is {len(raw)} bytes, limit {MAX_BATCH_BYTES}")
    d = _decode(raw, MAX_BATCH_BYTES, "batch")
    _need(isinstance(d, dict) and set(d) == {"domain", "v", "payee", "created", "channels"}, "bad_batch",
          "a batch is a map of exactly domain, v, payee, created, channels")
    _need(d["domain"] == BATCH_DOMAIN and d["v"] == FORMAT_VERSION, "bad_batch", "not a kvnet/settlement-batch/v1")
    _need(d["payee"] is None or (isinstance(d["payee"], bytes) and len(d["payee"]) == 32), "bad_batch",
          "payee must be nil or a 32-byte key")
    _need(_is_int(d["created"]) and isinstance(d["channels"], list), "bad_batch", "created int, channels array")
    want_payee = payee if payee is not None else d["payee"]
    summary = BatchSummary(d["payee"], d["created"])
    seen: set[bytes] = set()
    for i, rs in enumerate(d["channels"]):
        _need(isinstance(rs, list) and len(rs) > 0 and all(isinstance(x, bytes) for x in rs), "bad_batch",
              f"channel {i}: a non-empty array of receipt bytes")
        summary.channels.append(_verify_channel(rs, want_payee, seen))
    return summary


def _verify_channel(rs: list[bytes], payee: bytes | None, seen: set[bytes]) -> ChannelTotal:
    first = parse_receipt(rs[0])
    cid = first.channel_id
    _need(cid not in seen, "bad_batch", "a channel appears twice in the batch")
    seen.add(cid)
    prev: SignedReceipt | None = None
    for x in rs:
        sr = parse_receipt(x)
        _need(payee is None or sr.receipt.channel.payee == payee, "wrong_payee",
              f"receipt seq {sr.receipt.seq} is made out to {sr.receipt.channel.payee.hex()[:16]}, not the payee")
        _need(sr.channel_id == cid, "wrong_channel", "a channel's list holds another channel's receipt")
        if prev is not None:
            check_next(prev.receipt.seq, prev.receipt.cumulative, prev.id, sr)
        prev = sr
    assert prev is not None
    a = first.receipt
    return ChannelTotal(a.channel, a.seq, prev.receipt.seq, a.cumulative - a.added, prev.receipt.cumulative, prev.raw)
