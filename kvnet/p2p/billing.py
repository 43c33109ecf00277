"""Payments on the wire (docs/payments.md, "On the wire"): the payee's `Biller`, the payer's `Payer`.

Receipts travel in the `receipt` field of the libp2p control messages that ask for pieces (a `pieces`
request, a bulk grant request) and on `/kvnet/receipts/1.0.0` (a payment with no request attached,
and publishers collecting the license receipts a host keeps for them). The bulk data connection
carries no payment data, so any faster transport reuses the same messages.

Payee (`Biller`, consulted by the pieces and bulk servers before they grant a request): it accepts the
request's receipts into its ledger, durably, before it grants anything; it grants the prefix of a
request that keeps the value granted to the payer beyond what it paid within the credit window (the
answer says how many pieces), answers `payment_required` over it, and cuts off as a `debtor` a payer
over it that, told to pay, sends no receipt at all. A request that finds no credit while bytes it
granted the payer are still being sent waits (at most HOLD_S) for their payment first, so that a
streaming payer's next grant is not the one piece past the window. For a manifest with a license price it grants
only what the payer's license receipts for it cover at this host (one load each). It keeps at most
MAX_ACCOUNTS payer accounts in memory (identities are free).

Payer (`Payer` per node, `FetchPayments` per fetch, called by kvnet.p2p.fetcher): it counts the
piece bytes each host delivered that verified, and when it builds the next request to that host, or
once PAY_EVERY bytes are unpaid (`pay_along`, over `/kvnet/receipts/1.0.0`), it signs one hosting
receipt for all of them (receipts per group of pieces, not per piece), records it and sends it. A
load's license receipt is signed once and goes with the first request to every host of the fetch.
Once every byte the fetch expects has verified it pays what is left at once (beside the store's last
commit); after the fetch it pays anything still left over `/kvnet/receipts/1.0.0`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from kvnet import receipts
from kvnet.errors import KvnetError, NetworkError
from kvnet.ledger import Cost, Ledger, SpendingLimitError, SpendingLimits
from kvnet.manifest import SignedManifest
from kvnet.p2p import wire
from kvnet.receipts import Channel, Line, ReceiptError, SignedReceipt, hosting_cost

__all__ = [
    "RECEIPTS_PROTOCOL", "RECEIPTS_FIELDS", "DEFAULT_WINDOW_MIB", "MAX_RECEIPTS_PER_REQUEST", "COLLECT_PAGE",
    "PRICE_SLACK", "PAYMENT_CODES", "Biller", "Payer", "FetchPayments", "PaymentWait", "PayDrop", "Candidate",
    "rank_by_price", "receipts_field", "peer_key", "default_window", "MAX_ACCOUNTS", "MAX_SPEEDS",
    "PAY_EVERY", "LICENSE_SHOWN_MAX_AGE_S", "HOLD_S",
]

log = logging.getLogger("kvnet.p2p.billing")

RECEIPTS_PROTOCOL = "/kvnet/receipts/1.0.0"
DEFAULT_WINDOW_MIB = 64  # default credit window: the cost of 64 MiB at the host's own fee
MAX_RECEIPTS_PER_REQUEST = 4  # receipts one request (or one `pay` message) may carry
COLLECT_PAGE = 256  # receipts per `collect` answer (256 x 8 KiB = 2 MiB, below the response limit)
PRICE_SLACK = 1.5  # providers whose price index is within this factor of the best one are used
RISK_PER_SCORE = 0.2  # each point of negative score makes a provider's price index 20% worse
RECEIPTS_FIELDS = frozenset({"v", "op", "receipt", "publisher", "after"})  # per op: see Biller.handle
MAX_ACCOUNTS = 4096  # payer accounts a payee keeps in memory; then settled ones are dropped, else `busy`
MAX_SPEEDS = 1024  # provider speeds a payer remembers (the oldest is forgotten first)
LICENSE_SHOWN_MAX_AGE_S = 3600  # a license receipt another host holds licenses a load here if signed this recently
MAX_SHOWN = 64  # such receipts an account remembers (each licenses one load here)
PAY_EVERY = 32 << 20  # verified bytes a payer lets accumulate per host before it pays them over `pay`
# requests paying nothing, with nothing open, after a `payment_required`, that are still answered
# `payment_required` before the payer is a debtor: they may have been sent before the payer saw the
# first refusal (a kvnet payer has at most 8 pieces streams and 8 bulk grant requests out to one host)
UNPAID_ASKS_BEFORE_DEBTOR = 16
# a request that finds no credit left while bytes granted to the same payer are still being sent waits
# this long at most for the payment of those bytes (their `pay` is usually on its way) before it is
# answered as the window allows; far below any payer's request timeout (kvnet's default is 10 s)
HOLD_S = 1.0
MAX_RESENDS = 3  # `skipped_sequence` answers a payer acts on per host and fetch before it drops the host
# error codes a payer acts on itself (the others end a request as before)
PAYMENT_CODES = frozenset({"payment_required", "debtor", "receipt_refused"})


def default_window(fee_per_mib: int) -> int:
    """The credit window (micro-units) a host gives when its operator sets none."""
    return hosting_cost(DEFAULT_WINDOW_MIB << 20, fee_per_mib)


def peer_key(peer: str) -> bytes | None:
    """The 32-byte Ed25519 key a base58 peer id embeds (kvnet peer ids are Ed25519 identity hashes)."""
    try:
        pub = ID.from_base58(peer).extract_public_key()
        raw = pub.to_bytes() if pub is not None else None
    except Exception:  # noqa: BLE001 - a peer id that is not an identity hash of a key
        return None
    return raw if isinstance(raw, bytes) and len(raw) == 32 else None


def receipts_field(req: dict) -> list[bytes]:
    """The `receipt` field of a request: nil/absent (no payment) or an array of 1..4 receipts' signed
    bytes, each at most 8,192. Anything else is `malformed` (docs/protocol.md)."""
    value = req.get("receipt")
    if value is None:
        return []
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_RECEIPTS_PER_REQUEST
            or not all(isinstance(r, bytes) and len(r) <= receipts.MAX_RECEIPT_BYTES for r in value)):
        raise wire.WireError("malformed", f"receipt must be nil or an array of 1..{MAX_RECEIPTS_PER_REQUEST} "
                                          f"receipts (bin, at most {receipts.MAX_RECEIPT_BYTES} bytes each)")
    return value


def _refused(exc: ReceiptError, seq: int | None = None, channel: bytes | None = None) -> wire.WireError:
    return wire.WireError("receipt_refused", str(exc), rule=exc.rule,
                          **({"seq": seq, "channel": channel} if seq is not None else {}))


# -- the payee ------------------------------------------------------------------------------------


@dataclass
class _Debt:
    """One payer's account at this payee, since this process started: piece bytes granted (counted
    when a request is granted, given back for what was not sent) and bytes its hosting receipts paid."""

    granted: int = 0
    paid: int = 0
    open: int = 0  # bytes of requests granted and not finished (a stream still sending, a grant not yet sent)
    warned: int = 0  # requests answered `payment_required` (paying nothing, nothing open) since it last paid
    licensed: dict[bytes, int] = field(default_factory=dict)  # manifest -> piece bytes its licenses still cover
    shown: list[bytes] = field(default_factory=list)  # ids of license receipts held elsewhere that licensed a load

    def settled(self) -> bool:
        """Nothing open and nothing owed: dropping the account forgets nothing the payee is owed."""
        return self.open == 0 and self.granted <= self.paid


class Biller:
    """The payee's side: takes receipts, keeps each payer within the credit window."""

    def __init__(self, ledger: Ledger, fee_per_mib: int, currency: str, window: int | None = None,
                 get_manifest: Callable[[bytes], Awaitable[SignedManifest]] | None = None,
                 max_accounts: int = MAX_ACCOUNTS) -> None:
        """`window`: the credit window in micro-units (None: `default_window(fee_per_mib)`);
        `get_manifest(id)` looks up a manifest a license receipt on `/kvnet/receipts/1.0.0` names;
        `max_accounts`: how many payer accounts it keeps in memory (`_debt`)."""
        self.max_accounts = max_accounts
        self.ledger = ledger
        self.fee_per_mib, self.currency = fee_per_mib, currency
        self.window = default_window(fee_per_mib) if window is None else window
        self.get_manifest = get_manifest
        self.accepted = 0  # receipts accepted (tests, stats)
        self.refusals: dict[str, int] = {}  # payment_required / debtor / receipt_refused -> count
        self.pays = 0  # `pay` messages taken (receipts that came without a request)
        self.peak_owed = 0  # the most any payer owed right after a grant, granted and unpaid included
        self._debts: dict[bytes, _Debt] = {}
        self._lock = threading.Lock()  # bulk listener threads give back unsent bytes
        self._db = trio.CapacityLimiter(1)
        self.hold_s = HOLD_S  # how long a request with no credit left may wait for a payment (`_hold`)
        self.held = 0  # requests that waited for a payment before they were answered (tests, stats)
        self._changed = trio.Event()  # an account was paid or a grant finished: held requests look again
        self._token: trio.lowlevel.TrioToken | None = None  # for `finished` from the bulk threads

    @property
    def me(self) -> bytes:
        assert self.ledger.me is not None
        return self.ledger.me

    def _debt(self, payer: bytes) -> _Debt:
        """`payer`'s account, opened if new. Identities are free, so the table is bounded: when it holds
        MAX_ACCOUNTS, the settled accounts are dropped (nothing open, nothing owed: a later request
        from that payer starts afresh, as after a restart); if none is settled, a new payer is refused
        `busy` and no other payer's account is touched. Call with the lock held."""
        debt = self._debts.get(payer)
        if debt is not None:
            return debt
        if len(self._debts) >= self.max_accounts:
            for key in [k for k, d in self._debts.items() if d.settled()]:
                del self._debts[key]
            if len(self._debts) >= self.max_accounts:
                self._count("busy")
                raise wire.WireError("busy", f"this host keeps at most {self.max_accounts} payer accounts, "
                                             "none of them settled: try again later")
        debt = self._debts[payer] = _Debt()
        return debt

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw), limiter=self._db)

    async def take(self, payer: bytes, raw: bytes, sm: SignedManifest | None) -> int:
        """Verify one receipt from `payer` and store it durably; the hosting bytes it pays (0 for a
        license receipt, or one this node already holds). Raises WireError('receipt_refused')."""
        try:
            sr = receipts.parse_receipt(raw)
        except ReceiptError as exc:
            self._count("receipt_refused")
            raise _refused(exc) from exc
        try:
            payee, currency = await self._check_lines(sr, sm)
            await self._call(self.ledger.accept, raw, payee, expect_payer=payer, expect_currency=currency)
        except ReceiptError as exc:
            if exc.rule == "replayed":  # a payer resending after a lost answer: already held, nothing new
                return 0
            if exc.rule == "skipped_sequence" and self._shown(payer, sr, sm):
                return 0  # a license receipt another host holds: it licenses this load here too
            seq = None
            if exc.rule == "skipped_sequence":
                latest = self.ledger.latest(sr.channel_id)
                seq = latest.seq if latest is not None else 0
            self._count("receipt_refused")
            raise _refused(exc, seq, sr.channel_id) from exc
        self.accepted += 1
        units = sum(ln.units for ln in sr.receipt.lines if ln.kind == "hosting")
        with self._lock:  # counted at once: a concurrent request of this payer sees it (no await between)
            d = self._debts.get(payer)
            if d is not None and units:
                # never beyond what this process granted: a payment for bytes served before a restart
                # (or before the account was dropped) settles them in the ledger but buys no new credit
                d.paid = min(d.paid + units, d.granted)
                d.warned = 0
            self._license(d, sr, sm)
        if units:
            self._wake()
        return units

    def _license(self, d: _Debt | None, sr: SignedReceipt, sm: SignedManifest | None) -> None:
        """Credit the license lines for the request's manifest: each load covers its piece bytes once."""
        if d is None or sm is None:
            return
        loads = sum(ln.units for ln in sr.receipt.lines if ln.kind == "license" and ln.manifest == sm.id)
        if loads:
            d.licensed[sm.id] = d.licensed.get(sm.id, 0) + loads * sm.manifest.total_bytes

    def _shown(self, payer: bytes, sr: SignedReceipt, sm: SignedManifest | None) -> bool:
        """A license-only receipt for the request's manifest that passed every one-receipt rule and its
        price but continues a channel this host does not hold (the payer pays a load's license once,
        through its first host, and shows the same receipt to the others): it licenses one load here,
        if it was signed within LICENSE_SHOWN_MAX_AGE_S and has not licensed one here before (shown
        again, it is taken as a replay: no refusal, no license)."""
        r = sr.receipt
        if (sm is None or not all(ln.kind == "license" and ln.manifest == sm.id for ln in r.lines)
                or abs(time.time() - r.time) > LICENSE_SHOWN_MAX_AGE_S):
            return False
        with self._lock:
            d = self._debts.get(payer)
            if d is None:
                return False
            if sr.id not in d.shown:  # shown again: like a replay, taken without licensing anything
                d.shown = [*d.shown[-(MAX_SHOWN - 1):], sr.id]
                self._license(d, sr, sm)
        return True

    async def _check_lines(self, sr: SignedReceipt, sm: SignedManifest | None) -> tuple[bytes, str]:
        """Each line priced as quoted: hosting at this node's fee (only in a receipt made out to us),
        license at its manifest's price, made out to its publisher. The (payee, currency) to accept with."""
        lines = sr.receipt.lines
        made_to_us = sr.receipt.channel.payee == self.me
        currency = self.currency if any(ln.kind == "hosting" for ln in lines) else None
        for ln in lines:
            if ln.kind == "hosting":
                if not made_to_us:
                    raise ReceiptError("wrong_payee", "hosting lines are paid to the host that served them")
                want = hosting_cost(ln.units, self.fee_per_mib)
                if ln.amount != want:
                    raise ReceiptError("wrong_amount", f"a hosting line for {ln.units} bytes at "
                                                       f"{self.fee_per_mib}/MiB costs {want}, not {ln.amount}")
                continue
            m = (sm if sm is not None and ln.manifest == sm.id else await self._manifest(ln.manifest)).manifest
            if m.publisher != sr.receipt.channel.payee:
                raise ReceiptError("wrong_payee", "a license is paid to the manifest's publisher")
            if currency is not None and m.terms.currency != currency:
                raise ReceiptError("wrong_currency", f"license in {m.terms.currency!r}, receipt in {currency!r}")
            currency = m.terms.currency
            if ln.amount != ln.units * m.terms.price_per_load:
                raise ReceiptError("wrong_amount", f"{ln.units} loads at {m.terms.price_per_load} cost "
                                                   f"{ln.units * m.terms.price_per_load}, not {ln.amount}")
        return sr.receipt.channel.payee, currency or self.currency

    async def _manifest(self, mid: bytes) -> SignedManifest:
        if self.get_manifest is None:
            raise ReceiptError("malformed", "license receipts come with a request for that manifest")
        try:
            return await self.get_manifest(mid)
        except Exception as exc:  # noqa: BLE001 - unknown manifest: we cannot check the price
            raise ReceiptError("malformed", "a license receipt for a manifest this node does not hold") from exc

    async def admit(self, peer: str, sm: SignedManifest, sizes: Sequence[int], raw: list[bytes]) -> int:
        """Before a request for pieces of `sm` (their byte sizes in request order) is granted: take its
        receipts (durably), then grant the longest prefix of the pieces that keeps what the payer owes,
        what it was granted and not yet paid included, within the credit window (at least one piece
        while it owes at most the window: a window smaller than a piece still serves); how many
        pieces. Over the window raise WireError `payment_required` (it paid something, not enough
        yet) or `debtor` (it paid nothing: it is recorded as a debtor, refused until a receipt
        raises what it paid). A request that finds no credit while bytes
        granted to the payer are still being sent waits for their payment first (`_hold`)."""
        payer = peer_key(peer)
        if payer is None:
            if raw or self.fee_per_mib:
                raise wire.WireError("malformed", "this peer id carries no Ed25519 key to pay or be paid with")
            return len(sizes)
        priced = sm.manifest.terms.price_per_load > 0 and sm.manifest.publisher != payer
        if self.fee_per_mib or priced:
            with self._lock:  # before its receipts are taken: a refused new payer leaves no trace
                self._debt(payer)
        paid_now = 0
        for r in raw:
            paid_now += await self.take(payer, r, sm)
        if priced:
            sizes = self._licensed(payer, sm, sizes)
        if self.fee_per_mib == 0:
            if priced:
                with self._lock:
                    self._use_license(self._debt(payer), sm, sum(sizes))
            return len(sizes)
        with self._lock:  # as it was when the payer asked (the debtor rule below judges what it knew then)
            idle = self._debt(payer).open == 0
        await self._hold(payer, sizes)
        with self._lock:
            debt = self._debt(payer)  # may have been dropped as settled meanwhile: then a fresh one
            unpaid = max(0, debt.granted - debt.paid)
            owed = hosting_cost(unpaid, self.fee_per_mib)
        debtor = self.ledger.is_debtor(payer)
        if debtor or owed > self.window:
            # everything it was granted was sent, it was told to pay, and it asks again paying nothing,
            # more often than it can have had requests on their way when it was told (once is not
            # enough: the last grant, or its payment over `pay`, may still be on its way)
            if debtor or (paid_now == 0 and idle and debt.warned > UNPAID_ASKS_BEFORE_DEBTOR):
                if not debtor:
                    await self._call(self.ledger.mark_debtor, payer, self.currency,
                                     self.ledger.paid_by(payer, self.currency) + 1,
                                     f"over the credit window of {self.window} with no payment")
                self._count("debtor")
                raise wire.WireError("debtor", f"{owed} owed, over the credit window of {self.window}: "
                                               "refused until a receipt pays for what was delivered")
            self._count("payment_required")
            if not debt.warned or (paid_now == 0 and idle):
                debt.warned += 1
            raise wire.WireError("payment_required", f"{owed} owed, the credit window is {self.window}: "
                                                     "the next request must pay for what was delivered")
        k = self._fits(unpaid, sizes)
        with self._lock:
            if priced:
                self._use_license(debt, sm, sum(sizes[:k]))
            debt.granted += sum(sizes[:k])
            debt.open += sum(sizes[:k])
            self.peak_owed = max(self.peak_owed, hosting_cost(max(0, debt.granted - debt.paid), self.fee_per_mib))
        return k

    async def _hold(self, payer: bytes, sizes: Sequence[int]) -> None:
        """Wait (at most `hold_s`) while the credit `payer` has left covers fewer of `sizes` (a prefix)
        than a quarter of the window would, and bytes granted to it are still being sent (or not yet
        redeemed). Why: a payer streaming at its window asks for its next grant while its payment for
        the bytes on their way is still in flight (`pay`, every PAY_EVERY verified bytes); answered at
        once, that request gets one piece or a few, which then hold one of the payer's grant slots
        until the grant before them is done, and the connection idles for the next request's round
        trip. Held, the request is answered as soon as a payment lands, with the credit it bought.
        Nothing is granted while waiting, so the window's bound is unchanged; a payer that sends no
        payment is answered as before, only later (once what it was granted is sent, or after `hold_s`)."""
        self._token = trio.lowlevel.current_trio_token()
        quarter = (self.window // 4 << 20) // self.fee_per_mib  # the bytes a quarter of the window buys
        want, total = 0, 0
        for n in sizes:
            if want and total + n > quarter:
                break
            want, total = want + 1, total + n
        held = False
        with trio.move_on_after(self.hold_s):
            while True:
                with self._lock:
                    d = self._debts.get(payer)
                    if d is None or d.open == 0:
                        return
                    unpaid = max(0, d.granted - d.paid)
                    changed = self._changed
                if self._room(unpaid, sizes) >= want:
                    return
                if not held:
                    held = True
                    self.held += 1
                await changed.wait()

    def _wake(self) -> None:
        """Held requests look at their accounts again (trio side)."""
        self._changed.set()
        self._changed = trio.Event()

    def _licensed(self, payer: bytes, sm: SignedManifest, sizes: Sequence[int]) -> Sequence[int]:
        """The prefix of `sizes` the payer's licenses for `sm` here still cover (taken from them when
        granted); with none, `payment_required` naming the license (the first request of a load
        brings its receipt)."""
        with self._lock:
            d = self._debt(payer)
            left = d.licensed.get(sm.id, 0)
            k, total = 0, 0
            while k < len(sizes) and total + sizes[k] <= left:
                total, k = total + sizes[k], k + 1
            if k:
                return sizes[:k]
        self._count("payment_required")
        terms = sm.manifest.terms
        raise wire.WireError("payment_required", f"a license: this manifest costs {terms.price_per_load} "
                                                 f"{terms.currency} per load, paid to its publisher with a license "
                                                 "receipt on the first request of the load", license=sm.id)

    @staticmethod
    def _use_license(d: _Debt, sm: SignedManifest, n: int) -> None:
        d.licensed[sm.id] = max(0, d.licensed.get(sm.id, 0) - n)

    def _fits(self, unpaid: int, sizes: Sequence[int]) -> int:
        """How many of `sizes` (a prefix) keep the cost of `unpaid` plus them within the window; at
        least one (the caller checked that `unpaid` alone costs at most the window). The one piece
        past the window keeps a payer going that owes exactly the window for bytes it never got (sent
        to it before it crashed): it pays for each piece it verifies, one request at a time."""
        return min(len(sizes), max(1, self._room(unpaid, sizes)))

    def _room(self, unpaid: int, sizes: Sequence[int]) -> int:
        """How many of `sizes` (a prefix) fit the window on top of `unpaid`, without the one piece past it."""
        k = 0
        for n in sizes:
            if hosting_cost(unpaid + n, self.fee_per_mib) > self.window:
                break
            unpaid += n
            k += 1
        return k

    def _count(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def finished(self, peer: str, granted: int, unsent: int) -> None:
        """A granted request of `granted` bytes is over; `unsent` of them were not sent after all
        (missing pieces, a failed or expired grant) and are not owed. Thread-safe."""
        payer = peer_key(peer)
        if payer is None or self.fee_per_mib == 0:
            return
        with self._lock:
            d = self._debts.get(payer)
            if d is None:  # cannot happen while a request is open (an open account is never dropped)
                return
            d.open = max(0, d.open - granted)
            d.granted = max(0, d.granted - unsent)
        token = self._token
        if token is not None:  # from a bulk thread or the trio side alike
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._wake)

    def owed(self, peer: str) -> int:
        """What `peer` owes now for bytes granted beyond its receipts (micro-units)."""
        payer = peer_key(peer)
        d = self._debts.get(payer or b"")
        return 0 if d is None else hosting_cost(max(0, d.granted - d.paid), self.fee_per_mib)

    # -- /kvnet/receipts/1.0.0 ------------------------------------------------------------------

    async def handle(self, peer: str, req: dict) -> dict:
        """One `/kvnet/receipts/1.0.0` request (already framed and version-checked): `pay` or `collect`."""
        op = req.get("op")
        if op == "pay":
            unknown = set(req) - {"v", "op", "receipt"}
            if unknown:
                raise wire.WireError("malformed", f"unknown fields {sorted(unknown)[:4]!r}")
            payer = peer_key(peer)
            raw = receipts_field(req)
            if payer is None or not raw:
                raise wire.WireError("malformed", "pay carries 1..4 receipts from a peer with an Ed25519 key")
            for r in raw:  # counted in the payer's account, if it has one (else its receipts are just stored)
                await self.take(payer, r, None)
            self.pays += 1
            return {"v": wire.PROTOCOL_VERSION, "ok": True}
        if op == "collect":
            unknown = set(req) - {"v", "op", "publisher", "after"}
            if unknown:
                raise wire.WireError("malformed", f"unknown fields {sorted(unknown)[:4]!r}")
            publisher = wire.field(req, "publisher", bytes, size=32)
            after = wire.field(req, "after", int)
            if after < 0:
                raise wire.WireError("malformed", "after must be >= 0")
            if peer_key(peer) != publisher:
                raise wire.WireError("forbidden", "only the publisher's own peer may collect its receipts")
            rows = await self._call(self.ledger.held_for, publisher, after, COLLECT_PAGE + 1)
            page = rows[:COLLECT_PAGE]
            return {"v": wire.PROTOCOL_VERSION, "receipts": [raw for _, raw in page],
                    "next": page[-1][0] if page else after, "more": len(rows) > COLLECT_PAGE}
        raise wire.WireError("malformed", "op must be \"pay\" or \"collect\"")


# -- the payer ------------------------------------------------------------------------------------


class PaymentWait(KvnetError):
    """The host wants payment before it serves more: pay for what verified, then ask again."""


class PayDrop(NetworkError):
    """The host bills what we do not owe (or refuses a correct receipt): drop it, score it down."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Candidate:
    """A provider as provider choice sees it."""

    peer: str
    fee_per_mib: int
    score: float = 0.0
    mb_per_s: float | None = None  # observed in an earlier fetch; None: unknown


def rank_by_price(cands: Sequence[Candidate]) -> list[tuple[str, float]]:
    """(peer, price index) best first. index = (fee + 1) x slowness x risk, where slowness is the
    fastest observed speed over this provider's (1 if unknown) and risk is 1 + 0.2 per point of
    negative score. Documented in docs/payments.md, "Choosing providers"."""
    speeds = [c.mb_per_s for c in cands if c.mb_per_s]
    fastest = max(speeds, default=None)
    out = []
    for c in cands:
        slow = fastest / c.mb_per_s if fastest and c.mb_per_s else 1.0
        risk = 1.0 + RISK_PER_SCORE * max(0.0, -c.score)
        out.append((c.peer, (c.fee_per_mib + 1) * slow * risk))
    return sorted(out, key=lambda x: x[1])


@dataclass
class _Account:
    """What one fetch owes one host."""

    peer: str
    key: bytes
    fee: int
    currency: str
    channel: Channel | None = None
    unpaid: int = 0  # verified piece bytes not yet in a receipt
    unsent: dict[tuple[bytes, int], bytes] = field(default_factory=dict)  # (channel, seq) -> raw, unacknowledged
    paid: int = 0  # micro-units signed to it in this fetch
    resends: int = 0  # `skipped_sequence` answers acted on (a host that keeps asking is dropped)
    granted: int = 0  # piece bytes it granted us in this fetch
    paid_bytes: int = 0  # piece bytes in the hosting lines we signed it in this fetch
    every: int = PAY_EVERY  # unpaid verified bytes that make `pay_along` pay it (less once it grants short)
    retried: bool = False  # asked again once with nothing to pay since the host last served us
    paying: int = 0  # `pay` messages to it in flight (`pay_along`)
    licensed: bool = False  # the load's license receipt went to it (with the first request)


class Payer:
    """A node's paying side: its ledger, spending limits, and the speeds it saw."""

    def __init__(self, ledger: Ledger, limits: SpendingLimits | None = None) -> None:
        self.ledger = ledger
        self.limits = limits or SpendingLimits()
        self.speeds: dict[str, float] = {}  # peer -> MB/s it delivered in the last fetch
        self._db = trio.CapacityLimiter(1)

    def start(self, sm: SignedManifest, providers: list, n_bytes: int, scores: Any) -> FetchPayments:
        """Check the spending limits for fetching `n_bytes` of `sm` and choose the providers (weighing
        price, score, speed) before any byte moves. Raises SpendingLimitError naming the limit when no
        provider can be paid within the limits. `providers` are kvnet.p2p.fetcher.Provider objects
        (fee_per_mib, currency set from their offers); the returned FetchPayments holds the chosen ones."""
        terms = sm.manifest.terms
        if terms.price_per_load > 0:
            self.limits.check(self.ledger, sm.manifest.publisher,
                              Cost(terms.price_per_load, terms.currency, price_per_load=terms.price_per_load))
        ok, first_err = [], None
        for p in providers:
            cost = Cost(hosting_cost(n_bytes, p.fee_per_mib), p.currency, fee_per_mib=p.fee_per_mib)
            try:
                if p.fee_per_mib > 0 and peer_key(p.peer) is None:
                    raise SpendingLimitError("currency", f"{p.peer} has no key to pay")
                self.limits.check(self.ledger, peer_key(p.peer) or b"", cost)
                if terms.price_per_load > 0 and self.limits.total_per_day is not None:
                    self.limits.check(self.ledger, b"", Cost(cost.total + terms.price_per_load, p.currency))
                ok.append(p)
            except SpendingLimitError as exc:
                first_err = first_err or exc
                log.info("provider %s left out: %s", p.peer, exc)
        if not ok:
            if first_err is not None:
                raise first_err
            return FetchPayments(self, sm, [])
        chosen = self._choose(ok, scores)
        return FetchPayments(self, sm, chosen, reserves=[p for p in ok if p not in chosen], expect=n_bytes)

    def _choose(self, providers: list, scores: Any) -> list:
        ranked = rank_by_price([Candidate(p.peer, p.fee_per_mib, scores.get(p.peer) if scores else 0.0,
                                          self.speeds.get(p.peer)) for p in providers])
        best = ranked[0][1]
        by_peer = {p.peer: p for p in providers}
        chosen = [by_peer[peer] for peer, idx in ranked if idx <= best * PRICE_SLACK]
        cheapest = min(p.fee_per_mib for p in chosen)
        # price only ever leaves out a pricier host: one as cheap is kept whatever its score (the
        # fetch itself avoids peers with a bad record, kvnet.p2p.scores)
        chosen += [by_peer[peer] for peer, _ in ranked
                   if by_peer[peer] not in chosen and by_peer[peer].fee_per_mib <= cheapest]
        held = set().union(*(p.have for p in chosen))
        for peer, _ in ranked:  # a pricier provider still joins for pieces the cheap ones lack
            p = by_peer[peer]
            if p not in chosen and not p.have <= held:
                chosen.append(p)
                held |= p.have
        return chosen

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db)

    def observed(self, result: Any) -> None:
        """Remember each provider's speed in a finished fetch (kvnet.p2p.fetcher.FetchResult)."""
        if result.seconds <= 0:
            return
        for peer, st in result.providers.items():
            if st.get("bytes") and not st.get("dropped"):
                self.speeds.pop(peer, None)  # re-inserted last: the dict is oldest-first
                self.speeds[peer] = st["bytes"] / 1e6 / result.seconds
        while len(self.speeds) > MAX_SPEEDS:  # providers are whoever announced: keep the table bounded
            del self.speeds[next(iter(self.speeds))]


class FetchPayments:
    """One fetch's payments: hosting per host, the load's license, receipts not yet acknowledged."""

    def __init__(self, payer: Payer, sm: SignedManifest, providers: list, reserves: list | None = None,
                 expect: int = 0) -> None:
        """`expect`: the piece bytes the fetch needs (0: unknown). Once that many have verified, the
        last payment goes at once instead of after the fetch (`pay_along`)."""
        self.payer, self.sm = payer, sm
        self.expect = expect
        self.verified_bytes = 0  # piece bytes verified from every host in this fetch
        self.last = False  # every byte expected has verified: pay what is unpaid now
        self.providers: list = []
        # within the spending limits but left out for their price: the fetch turns to them only when
        # the chosen ones cannot deliver (a cheap provider that lies in its offers, or vanishes, must
        # not deny a fetch that a pricier honest one can serve)
        self.reserves: list = list(reserves or [])
        self.accounts: dict[str, _Account] = {}
        self._add(providers)
        # a load's license: signed once (on the channel to the publisher via the first host asked) and
        # shown with the first request to every host of the fetch (each requires it, docs/payments.md)
        self.license_due = (sm.manifest.terms.price_per_load > 0
                            and sm.manifest.publisher != payer.ledger.me)
        self.license: tuple[tuple[bytes, int], bytes] | None = None  # ((channel, seq), raw) once signed
        self.lock = trio.Lock()  # receipts are signed one at a time, in sequence order
        self._unpaid_lock = threading.Lock()  # `verified` runs in receiving threads, `attach` in trio
        self._due = trio.Event()  # something is due for `pay_along`
        self._token: trio.lowlevel.TrioToken | None = None  # while `pay_along` runs

    def _add(self, providers: list) -> None:
        for p in providers:
            self.providers.append(p)
            key = peer_key(p.peer)
            if key is not None and p.peer not in self.accounts:
                self.accounts[p.peer] = _Account(p.peer, key, p.fee_per_mib, p.currency)

    def use_reserves(self) -> list:
        """The reserve providers, now paid like the chosen ones (the load's license, signed at most once,
        is shown to them as to every host of the fetch); [] when there are none left."""
        reserves, self.reserves = self.reserves, []
        self._add(reserves)
        return reserves

    def verified(self, peer: str, n: int) -> None:
        """`n` piece bytes from `peer` verified against the manifest: owed to it at its fee. Once
        `every` bytes are unpaid (PAY_EVERY, less for a host at its window), or once every byte the
        fetch expects has verified, `pay_along` pays them. The last payment then overlaps the
        store's last group commit and the fetch's end instead of following them (`settle` finds
        nothing left to pay)."""
        acct = self.accounts.get(peer)
        with self._unpaid_lock:  # called from the bulk receiving threads too
            self.verified_bytes += n
            last = not self.last and 0 < self.expect <= self.verified_bytes
            self.last = self.last or last
            due = False
            if acct is not None and acct.fee > 0:
                acct.unpaid += n
                due = acct.unpaid >= acct.every or self.last
        if due or last:
            self._signal()

    def granted(self, peer: str, n: int, short: bool) -> None:
        """`peer` granted `n` piece bytes; `short`: fewer than asked, so it is at its credit window.
        Then what it granted beyond what we paid estimates its window, and `pay_along` pays every half
        of that (at most PAY_EVERY), so that its next grants do not wait for our requests."""
        acct = self.accounts.get(peer)
        if acct is None or acct.fee == 0:
            return
        acct.granted += n
        if short:
            acct.every = max(1, min(PAY_EVERY, (acct.granted - acct.paid_bytes) // 2))
            self._signal()

    def _signal(self) -> None:
        """Wake `pay_along` (from any thread)."""
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._due.set()

    async def pay_along(self, open_stream: Callable[[str, str], Awaitable[Any]], timeout: float,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """While the fetch runs (in its nursery, cancelled with it): pay each host over
        `/kvnet/receipts/1.0.0` as verified bytes accumulate, so a streaming fetch does not stall on
        the host's credit window waiting for its next request to carry the payment. Never raises:
        a failed payment is recorded and goes with the next request or `settle`. A payment once begun
        is finished even when the fetch ends meanwhile (within `timeout`): the last one usually is
        in flight then, and a request cut halfway costs the connection (kvnet.p2p.compat)."""
        self._token = trio.lowlevel.current_trio_token()
        self._due.set()  # what verified before it started
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await self._due.wait()
                    self._due = trio.Event()
                    for acct in list(self.accounts.values()):
                        # one payment in flight per host; the last one goes at once, beside it: both
                        # carry every receipt not yet acknowledged, so the host never sees a gap
                        if (acct.unpaid > 0 and (acct.unpaid >= acct.every or self.last)
                                and acct.paying < (2 if self.last else 1)):
                            acct.paying += 1
                            nursery.start_soon(self._pay_task, acct, open_stream, timeout)
        finally:
            self._token = None

    async def _pay_task(self, acct: _Account, open_stream: Callable[[str, str], Awaitable[Any]],
                        timeout: float) -> None:
        with _uncancelled():
            try:
                await self._pay_now(acct, open_stream, timeout)
            finally:
                acct.paying -= 1
                self._due.set()  # what verified meanwhile may be due now

    async def _pay_now(self, acct: _Account, open_stream: Callable[[str, str], Awaitable[Any]],
                       timeout: float) -> None:
        try:
            raw = await self.attach(acct.peer)
            if not raw:
                return
            with trio.fail_after(timeout):
                answer = await _ask(open_stream, acct.peer, {"v": wire.PROTOCOL_VERSION, "op": "pay", "receipt": raw})
            if "err" in answer:
                await self.refused(acct.peer, answer, raw)
            self.acknowledged(acct.peer, raw)
        except Exception as exc:  # noqa: BLE001 - recorded; resent with the next request or at the end
            log.info("paying %s along the fetch failed: %r", acct.peer, exc)

    async def attach(self, peer: str) -> list[bytes] | None:
        """The `receipt` field of the next request to `peer`: its unacknowledged receipts, after signing
        (and recording) a hosting receipt for what verified since the last one and, with the load's
        first request, the license receipt. None when there is nothing to pay."""
        acct = self.accounts.get(peer)
        if acct is None:
            return None
        with _uncancelled():  # a receipt signed is recorded here too, cancelled or not
            await self._sign_due(acct)
        if not acct.unsent:
            return None
        return [acct.unsent[k] for k in sorted(acct.unsent)[:MAX_RECEIPTS_PER_REQUEST]]

    async def _sign_due(self, acct: _Account) -> None:
        async with self.lock:
            if self.license_due and not acct.licensed:
                if self.license is None:
                    terms = self.sm.manifest.terms
                    ch = await self.payer.call(self.payer.ledger.open_channel, self.sm.manifest.publisher,
                                               terms.currency, acct.key)
                    sr = await self.payer.call(self.payer.ledger.pay, ch, [Line(self.sm.id, "license", 1,
                                                                               terms.price_per_load)])
                    self.license = ((ch.id, sr.receipt.seq), sr.raw)
                acct.unsent[self.license[0]] = self.license[1]
                acct.licensed = True
            if acct.unpaid > 0:
                with self._unpaid_lock:
                    n, acct.unpaid = acct.unpaid, 0
                if acct.channel is None:
                    acct.channel = await self.payer.call(self.payer.ledger.open_channel, acct.key, acct.currency)
                line = Line(self.sm.id, "hosting", n, hosting_cost(n, acct.fee))
                acct.paid_bytes += n
                sr = await self.payer.call(self.payer.ledger.pay, acct.channel, [line])
                acct.unsent[(acct.channel.id, sr.receipt.seq)] = sr.raw
                acct.paid += line.amount

    def acknowledged(self, peer: str, sent: list[bytes] | None, served: bool = True) -> None:
        """The host took the receipts `sent` with a request: it served it (`served`) or refused it
        for payment (`refused`)."""
        acct = self.accounts.get(peer)
        if acct is not None and served:
            acct.retried = False
        if acct is None or not sent:
            return
        done = set(sent)
        acct.unsent = {k: v for k, v in acct.unsent.items() if v not in done}

    async def refused(self, peer: str, head: dict, sent: list[bytes] | None = None) -> None:
        """A payment refusal from `peer` of a request that carried `sent`: raise PaymentWait (pay,
        then ask again) or PayDrop. `payment_required` and `debtor` come after the host took the
        request's receipts, so those are acknowledged (resending them would change nothing)."""
        code = head.get("err")
        acct = self.accounts.get(peer)
        if code == "payment_required" and head.get("license") is not None:
            if head.get("license") != self.sm.id or acct is None or acct.licensed and not acct.unsent:
                raise PayDrop("overbilled", "the host asks for a second license in one load")
            self.acknowledged(peer, sent, served=False)
            raise PaymentWait("the host wants the load's license receipt first")
        if code in ("payment_required", "debtor"):
            self.acknowledged(peer, sent, served=False)
            raise PaymentWait(f"{code}: {head.get('msg', '')}")
        rule = head.get("rule")
        acct = self.accounts.get(peer)
        if rule == "skipped_sequence" and acct is not None and isinstance(head.get("seq"), int) \
                and isinstance(head.get("channel"), bytes):
            acct.resends += 1
            missing = await self.payer.call(self.payer.ledger.receipts_after, head["channel"], head["seq"])
            if not missing or acct.resends > MAX_RESENDS:
                raise PayDrop("protocol", "host claims it lacks receipts we never signed")
            for raw in missing:  # resend what the host lacks, in order (docs/payments.md, "Paying")
                sr = receipts.parse_receipt(raw)
                acct.unsent[(sr.channel_id, sr.receipt.seq)] = raw
            raise PaymentWait("resending receipts the host lacks")
        reason = "overbilled" if rule in ("wrong_amount", "wrong_currency") else "protocol"
        raise PayDrop(reason, f"host refused a correct receipt ({rule}): {head.get('msg', '')}")

    async def wait(self, peer: str, in_flight: Callable[[], bool], changed: Callable[[], Awaitable[None]]) -> None:
        """After PaymentWait: return once there is something to pay `peer` (the next request carries
        it); raise PayDrop('overbilled') if it wants payment while everything it delivered is paid and
        nothing more is on its way (it bills more than its offer's fee)."""
        acct = self.accounts.get(peer)
        while True:
            async with self.lock:  # a receipt being signed is in neither `unpaid` nor `unsent` until it is done
                due = acct is not None and (acct.unpaid > 0 or bool(acct.unsent))
            if due:
                return
            if not in_flight():
                # once, ask again: a payment over `pay` may have reached the host after it refused
                if acct is not None and not acct.retried:
                    acct.retried = True
                    return
                raise PayDrop("overbilled", "the host wants payment beyond what it delivered at its offer's fee")
            await changed()

    async def settle(self, open_stream: Callable[[str, str], Awaitable[Any]], timeout: float) -> None:
        """After the fetch: pay every host for what verified since its last receipt and deliver the
        receipts it has not acknowledged, over `/kvnet/receipts/1.0.0` (`pay`). Failures are logged:
        the receipts are recorded, and the next request to that host resends them."""
        for acct in self.accounts.values():
            try:
                while True:
                    raw = await self.attach(acct.peer)
                    if not raw:
                        break
                    with trio.fail_after(timeout):
                        answer = await _ask(open_stream, acct.peer, {"v": wire.PROTOCOL_VERSION, "op": "pay",
                                                                     "receipt": raw})
                    if "err" in answer:
                        await self.refused(acct.peer, answer, raw)
                    self.acknowledged(acct.peer, raw)
            except PaymentWait:
                try:  # the host lacked earlier receipts: one more round with them
                    raw = await self.attach(acct.peer)
                    if raw:
                        with trio.fail_after(timeout):
                            answer = await _ask(open_stream, acct.peer, {"v": 1, "op": "pay", "receipt": raw})
                        if "err" not in answer:
                            self.acknowledged(acct.peer, raw)
                except Exception as exc:  # noqa: BLE001 - recorded; resent with the next request
                    log.info("paying %s failed: %r", acct.peer, exc)
            except Exception as exc:  # noqa: BLE001 - recorded; resent with the next request
                log.info("paying %s failed: %r", acct.peer, exc)

    def totals(self) -> dict[str, int]:
        """peer -> micro-units signed to it for hosting in this fetch."""
        return {a.peer: a.paid for a in self.accounts.values()}


def _uncancelled() -> trio.CancelScope:
    return trio.CancelScope(shield=True)


async def _ask(open_stream: Callable[[str, str], Awaitable[Any]], peer: str, req: dict) -> dict:
    stream = await open_stream(peer, RECEIPTS_PROTOCOL)
    try:
        await wire.write_frame(stream, req)
        return await wire.read_frame(stream, wire.MAX_RESPONSE)
    finally:
        with contextlib.suppress(Exception):  # the peer may be gone
            await stream.close()


async def collect(open_stream: Callable[[str, str], Awaitable[Any]], peer: str, ledger: Ledger,
                  timeout: float = 10.0, publisher: bytes | None = None) -> int:
    """As a publisher: collect the license receipts `peer` holds for us into our ledger (`in`);
    the number newly accepted. A refusal raises WireError with the host's code (`forbidden`).
    `publisher` (default: our key) exists so tests can ask for someone else's and be refused."""
    assert ledger.me is not None
    after, new = 0, 0
    while True:
        with trio.fail_after(timeout):
            answer = await _ask(open_stream, peer, {"v": wire.PROTOCOL_VERSION, "op": "collect",
                                                    "publisher": publisher or ledger.me, "after": after})
        if "err" in answer:
            raise wire.WireError(str(answer.get("err")), str(answer.get("msg", "")))
        for raw in wire.field(answer, "receipts", list):
            try:
                await trio.to_thread.run_sync(lambda r=raw: ledger.accept(r, ledger.me))
                new += 1
            except ReceiptError as exc:
                if exc.rule != "replayed":
                    raise
        after = wire.field(answer, "next", int)
        if not answer.get("more"):
            return new
