"""Parallel, multi-provider, verified piece fetching.

Pieces are assigned across providers in batches; each provider gets `window` concurrent requests
(pipelining). When nothing is left to assign, idle workers re-request pieces still in flight
elsewhere (endgame), and the first verified copy wins. Each received piece is checked (length, then
BLAKE3 against the signed manifest) as soon as it is read, so a liar is dropped before it can be sent
another request; verified pieces go straight from the thread that received them to the store's
`GroupWriter` (kvnet.store_writer: writer threads, one fdatasync and one index commit per group, not
hashed again): no event-loop round trip per piece; only group completions reach the trio side. A
provider that sends a bad piece, a wrong length, a protocol violation or nothing before the timeout
is dropped for this fetch, scored down persistently, gets no further request in this fetch, and its
pieces go back to the pool.

With `bulk` set (the default of a node's fetch), each provider is first asked for a bulk grant
(`/kvnet/bulk/1.0.0`, kvnet.p2p.bulk_wire): its pieces then come over one side connection (TLS 1.3 or
plain TCP) that carries one grant after another, with the next grant requested while the current one
streams. When the provider does not speak bulk, or the connection or TLS cannot be set up, the fetch
falls back to `pieces` streams for that provider. With several providers, a connection asks for its
next grant only when little of its current one is left to receive (a low-water mark of a few grant
round trips at its measured rate), and each grant is that provider's part of the work left, split by
the providers' measured rates, so that the pieces not yet granted stay in the pool and the providers
finish together with few grants. Endgame duplicates are requested only for the last few pieces, one
per request, and only of a provider that has stopped delivering; a bulk connection is cut as soon as
the fetch is complete, so the bytes received stay close to the artifact's size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from kvnet.errors import NetworkError
from kvnet.manifest import SignedManifest
from kvnet.p2p import billing, bulk_wire, wire
from kvnet.p2p.bulk_client import BulkConnection, ClientGrant, Handler
from kvnet.p2p.scores import PeerScores
from kvnet.p2p.server import PIECES_PROTOCOL, StoreRunner
from kvnet.pieces import ArtifactError, verify_piece
from kvnet.store_writer import Buffer, GroupWriter, WriterClosedError, Written

log = logging.getLogger("kvnet.p2p.fetcher")

OpenStream = Callable[[str, str], Awaitable[Any]]
WRITE_QUEUE = 32  # received pieces waiting for the writer (bounds memory: 32 MiB with 1 MiB pieces)
WRITE_BATCH = 16  # pieces per group commit (one fdatasync, one index transaction)
BULK_BATCH = 64  # pieces per bulk grant (at most the 64 a request may ask for)
# The smallest bulk grant while more is left: a grant is a provider's part of the work left
# (Fetch._bulk_share), which shrinks as a fetch ends, and a grant that streams in less time than the
# next grant's libp2p round trip (20-50 ms on 2 loaded cores, up to ~700 ms) idles the connection:
# 256 pieces from 3 providers took 18 grants (down to 8, 4 and 1 pieces) with shares of
# left / (2 x live) and a floor of 8, and 7 from 1 provider; with left / live and this floor, 7 and 4.
# The floor is never above an even split of the whole fetch among the live providers: 40 pieces from
# 3 providers shaped to 100 Mbit each went 16/16/8 (2.4x one provider) with a floor of 16, since the
# third finished early and idled; 14/14/12 ends together.
MIN_BULK_GRANT = 16
BULK_GRANTS_AHEAD = 2  # grants outstanding per bulk connection: one streaming, the next already redeemed
# With other live providers, a connection asks for its next grant only once what it still has to
# receive is down to LOOKAHEAD grant round trips at its measured rate (never fewer than LOW_WATER_MIN
# pieces): the pieces not yet granted stay in the pool, where whichever provider is ahead takes them,
# and the last grants are sized to finish together instead of being asked for at the start (256
# pieces from 3 loopback providers took 8-11 grants, the last ones of 7 and 1 pieces, and endgame
# duplicates; from 1 provider, 4). A lone provider asks at once (nobody to share the pool with).
LOOKAHEAD = 2.0
LOW_WATER_MIN = 4
RTT_DECAY = 0.75  # a grant round trip's weight in the next estimate (under load they vary 20-700 ms)
LOW_WATER_RECHECK_S = 0.25  # a connection waiting for its low-water mark re-reads its rate this often
ENDGAME_PIECES = 4  # duplicate requests start only once this few pieces are left unreceived
# ... and only for a piece asked of its provider at least this long ago, from a provider that has
# delivered nothing for as long (Fetch._duplicate_due): a duplicate is paid for and doubles the bytes,
# so a piece on its way from a healthy provider is not asked twice (a small artifact is all endgame:
# without the wait every piece of it came, and was paid, twice)
ENDGAME_AFTER_S = 1.0


class FetchError(NetworkError):
    """The fetch could not complete: every provider failed or nobody has some pieces."""


@dataclass
class Provider:
    peer: str  # base58 peer id
    have: set[int]
    dropped: str | None = None  # why, once dropped
    pieces: int = 0
    bytes: int = 0
    received: int = 0  # piece bytes read from this provider, endgame duplicates and discarded ones included
    path: str = "streams"  # how its pieces came: "streams", "bulk-tls" or "bulk-tcp"
    connected: bool = False  # a stream was opened to it in this fetch (so the libp2p connection exists)
    fee_per_mib: int = 0  # its offer's hosting fee and currency (kvnet.p2p.billing pays it)
    currency: str = "USD"
    missing: int = 0  # pieces its offer claimed that it then answered "missing" for
    endgame_at: float = math.inf  # (trio clock) when a duplicate it could ask for becomes due
    dial_lock: trio.Lock = field(default_factory=trio.Lock)
    # progress, for grant sizing and endgame (time.monotonic; written by the thread that receives)
    first_piece_at: float | None = None
    first_piece_bytes: int = 0  # `received` once its first piece was read
    last_piece_at: float = 0.0
    grant_rtt: float = 0.0  # seconds of its bulk grants' libp2p round trips (a decaying maximum)

    def progress(self, n: int) -> None:
        """`n` piece bytes were read from it (from any thread; only its receiver calls this)."""
        now = time.monotonic()
        self.received += n
        if self.first_piece_at is None:  # the rate counts what came after the first piece
            self.first_piece_at, self.first_piece_bytes = now, self.received
        self.last_piece_at = now

    def rate(self) -> float | None:
        """Bytes per second it delivered since its first piece (None until two pieces came)."""
        if self.first_piece_at is None or self.received <= self.first_piece_bytes:
            return None
        span = self.last_piece_at - self.first_piece_at
        return (self.received - self.first_piece_bytes) / span if span > 0 else None


@dataclass
class FetchResult:
    manifest_id: bytes
    fetched: int
    already_had: int
    bytes: int
    seconds: float
    providers: dict[str, dict] = field(default_factory=dict)
    received_bytes: int = 0  # piece bytes read from all providers (>= bytes: endgame duplicates)
    paths: dict[str, str] = field(default_factory=dict)  # peer -> "streams", "bulk-tls" or "bulk-tcp"
    store_timers: dict[str, float] = field(default_factory=dict)  # the group writer's (for benchmarks)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class _Drop(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Fetch:
    """One fetch of a set of pieces of one manifest."""

    def __init__(self, signed: SignedManifest, needed: list[int], providers: list[Provider], runner: StoreRunner,
                 open_stream: OpenStream, scores: PeerScores, *, window: int = 4, batch: int = 8,
                 timeout: float = 10.0, on_piece: Callable[[int, int], None] | None = None,
                 bulk: str | None = None, bulk_batch: int = BULK_BATCH,
                 payments: billing.FetchPayments | None = None,
                 on_verified: Callable[[int, Buffer], None] | None = None) -> None:
        """`bulk`: the bulk mode to ask providers for ("tls", "tcp"), or None for `pieces` streams only;
        `payments`: pays hosts for verified pieces and carries the receipts on requests (None: free);
        `on_verified(index, data)`: called from a store writer thread with the first verified copy of
        each piece once it is written (`data` is reused once it returns; off the receiving thread, so
        it does not slow the receiver): a reader that builds the KV as pieces arrive
        (kvnet.artifact.KVBuilder) need not read them back from the store."""
        self.payments = payments
        self.sm, self.m = signed, signed.manifest
        self.pending = set(needed)
        self.total = len(self.pending)
        self.providers = providers
        self.runner, self.open_stream, self.scores = runner, open_stream, scores
        self.window, self.batch, self.timeout = window, batch, timeout
        if bulk is not None and bulk not in bulk_wire.MODES:
            raise ValueError(f"bulk mode must be one of {sorted(bulk_wire.MODES)} or None")
        self.bulk, self.bulk_batch = bulk, bulk_batch
        self.buffers: queue.SimpleQueue = queue.SimpleQueue()  # piece buffers the bulk receivers reuse
        self.on_piece, self.on_verified = on_piece, on_verified
        self.in_flight: dict[int, set[str]] = {}  # piece -> peers asked for it
        self.asked_at: dict[int, float] = {}  # piece in flight -> when it was first asked (trio clock)
        self.changed = trio.Event()
        self.fetched = 0
        self.bytes = 0
        self.queued: set[int] = set()  # received, handed to the writer, not yet committed
        self.failure: Exception | None = None
        self.writer: GroupWriter | None = None  # while `run` runs
        self.store_timers: dict[str, float] = {}
        # `queued` (and the claim of a piece) is shared with receiver threads; `pending` changes only
        # on the trio side, under this lock too, so a thread's claim sees a consistent pair.
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None

    # -- assignment -----------------------------------------------------------------------------

    def _take(self, p: Provider, bulk: bool = False) -> list[int]:
        """Next batch for `p`: unassigned pieces it has, else (endgame, only for the last
        ENDGAME_PIECES pieces) one piece in flight at exactly one other provider that has stalled.

        A `pieces` request is up to `batch` pieces, but no more than a share of what is left per
        request slot of the live providers, so that every provider gets work. A bulk grant is up to
        `bulk_batch` pieces, but no more than `p`'s part of the work left (`_bulk_share`), so that
        the providers finish together instead of one ending the fetch alone; never fewer than
        MIN_BULK_GRANT (or an even split of the whole fetch, if smaller), since each grant costs a
        libp2p round trip on both sides."""
        # rarest first (then in order, so grants stay runs of consecutive pieces): a provider takes the
        # pieces fewer live providers hold before those others could serve too, so the one host of some
        # pieces (often a pricier one, kept for them, kvnet.p2p.billing) is not busy with shared ones
        live_have = [q.have for q in self.providers if q.dropped is None]
        fresh = sorted((i for i in self.pending if i in p.have and i not in self.in_flight),
                       key=lambda i: (sum(i in h for h in live_have), i))
        live = sum(1 for q in self.providers if q.dropped is None) or 1
        if bulk:
            floor = min(MIN_BULK_GRANT, math.ceil(self.total / live))
            fresh = fresh[: min(self.bulk_batch, max(floor, self._bulk_share(p, len(fresh))))]
        else:  # so that the first providers' windows do not take everything (3 providers used only 1-2)
            fresh = fresh[: min(self.batch, max(1, len(fresh) // (self.window * live)))]
        now = trio.current_time()
        p.endgame_at = math.inf
        if not fresh:
            with self._lock:
                unqueued = sorted(self.pending - self.queued)
            if len(unqueued) <= ENDGAME_PIECES:
                dup = [i for i in unqueued if i in p.have and len(self.in_flight.get(i, ())) == 1
                       and p.peer not in self.in_flight[i]]
                fresh = [i for i in dup if self._duplicate_due(i, now) <= now][:1]
                if dup and not fresh:  # wake this provider's waiter when the first one is due
                    p.endgame_at = min(self._duplicate_due(i, now) for i in dup)
        for i in fresh:
            self.in_flight.setdefault(i, set()).add(p.peer)
            self.asked_at.setdefault(i, now)
        return fresh

    def _bulk_share(self, p: Provider, left: int) -> int:
        """How many of the `left` unassigned pieces `p` should take so that every live provider ends
        at about the same time: the work left (unassigned plus what each has outstanding) split in
        proportion to the providers' measured rates (equal while unknown), minus what `p` still has
        outstanding. A lone provider takes everything (in full grants)."""
        live = [q for q in self.providers if q.dropped is None]
        if len(live) <= 1:
            return left
        with self._lock:
            queued = set(self.queued)
        outstanding = dict.fromkeys((q.peer for q in live), 0)
        for i, askers in self.in_flight.items():
            if i not in queued:
                for a in askers:
                    if a in outstanding:
                        outstanding[a] += 1
        rates = {q.peer: q.rate() for q in live}
        known = [r for r in rates.values() if r]
        default = sum(known) / len(known) if known else 1.0
        weight = {peer: r or default for peer, r in rates.items()}
        work = left + sum(outstanding.values())
        return math.ceil(work * weight[p.peer] / sum(weight.values()) - outstanding[p.peer])

    def _duplicate_due(self, i: int, now: float) -> float:
        """When (trio clock) an endgame duplicate of piece `i` becomes due: ENDGAME_AFTER_S after it
        was asked, and ENDGAME_AFTER_S after the last piece its provider delivered. A provider that
        keeps delivering is not stalled: the piece comes in its turn (a grant streams in order), and
        a copy would be paid for and double the bytes (a loaded 3-provider fetch that outlasted
        ENDGAME_AFTER_S received 1.004-1.012x the artifact while every provider was streaming)."""
        by_peer = {q.peer: q for q in self.providers}
        holder = by_peer.get(next(iter(self.in_flight[i])))
        due = self.asked_at[i] + ENDGAME_AFTER_S
        if holder is not None and holder.last_piece_at:
            due = max(due, now + holder.last_piece_at + ENDGAME_AFTER_S - time.monotonic())
        return due

    async def _wait_changed(self, p: Provider) -> None:
        """Until the fetch changes, or until an endgame duplicate `p` could ask for is due."""
        with trio.move_on_at(p.endgame_at):
            await self.changed.wait()

    def _release(self, p: Provider, pieces: list[int]) -> None:
        for i in pieces:
            askers = self.in_flight.get(i)
            if askers is not None:
                askers.discard(p.peer)
                if not askers:
                    del self.in_flight[i]
                    self.asked_at.pop(i, None)
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _obtainable(self) -> bool:
        """Is some pending piece queued for writing or held by a live provider?"""
        live = [p for p in self.providers if p.dropped is None]
        with self._lock:
            queued = set(self.queued)
        return any(i in queued or any(i in p.have for p in live) for i in self.pending)

    # -- transfer -------------------------------------------------------------------------------

    async def _request(self, p: Provider, pieces: list[int]) -> None:
        """Ask `p` for `pieces` on one stream and store what verifies."""
        remaining = set(pieces)
        with trio.fail_after(self.timeout):
            stream = await self._open(p, PIECES_PROTOCOL)
        try:
            ranges = _ranges(pieces)
            paid = await self._receipts(p)
            with trio.fail_after(self.timeout):
                await wire.write_frame(stream, {"v": wire.PROTOCOL_VERSION, "manifest": self.sm.id,
                                                "ranges": ranges, "receipt": paid})
            while True:
                with trio.fail_after(self.timeout):
                    head = await wire.read_frame(stream, wire.MAX_REQUEST)
                paid = await self._paid(p, paid, head)
                if head.get("done") is True:  # a host at its credit window may grant a prefix only
                    short = set(pieces) - set(self._granted(p, head, pieces))
                    if remaining - short:
                        raise _Drop("protocol", f"stream ended without pieces {sorted(remaining - short)[:5]}")
                    break
                if "err" in head and "i" not in head:
                    # over its serving limits (busy, rate_limited) a provider is merely loaded, not lying
                    reason = "refused" if head.get("err") in wire.LOAD_CODES else "protocol"
                    raise _Drop(reason, f"peer refused: {head.get('err')} {head.get('msg', '')}")
                i = wire.field(head, "i", int)
                if i not in remaining:
                    raise _Drop("protocol", f"unrequested or repeated piece {i}")
                if head.get("err") == "missing":
                    remaining.discard(i)
                    p.have.discard(i)
                    p.missing += 1
                    self._release(p, [i])
                    continue
                n = wire.field(head, "n", int)
                if n != self.m.piece_len(i):
                    raise _Drop("bad_length", f"piece {i}: {n} bytes announced, manifest says {self.m.piece_len(i)}")
                try:
                    with trio.fail_after(self.timeout):
                        data = await wire.read_exact(stream, n)
                except wire.WireError as exc:
                    raise _Drop("bad_length", f"piece {i}: {exc}") from exc
                p.progress(n)
                try:  # caught here, before this peer is sent another request
                    verify_piece(self.m, i, data)
                except ArtifactError as exc:
                    raise _Drop("bad_piece", str(exc)) from exc
                await trio.to_thread.run_sync(self.offer, p, i, data)  # to the writer, which stores it
                remaining.discard(i)
        except wire.WireError as exc:
            raise _Drop("protocol", str(exc)) from exc
        except trio.TooSlowError as exc:
            raise _Drop("timeout", f"no data within {self.timeout} s") from exc
        finally:
            self._release(p, sorted(remaining))
            with contextlib.suppress(Exception):
                await stream.close()

    async def _open(self, p: Provider, protocol: str) -> Any:
        """A stream to `p`; the first one of a fetch is opened alone, so that concurrent requests do
        not each dial the provider (parallel dials to one peer fail, and the provider was dropped)."""
        if p.connected:
            return await self.open_stream(p.peer, protocol)
        async with p.dial_lock:
            stream = await self.open_stream(p.peer, protocol)
            p.connected = True
            return stream

    async def _receipts(self, p: Provider) -> list[bytes] | None:
        """The `receipt` field of the next request to `p` (kvnet.p2p.billing)."""
        return None if self.payments is None else await self.payments.attach(p.peer)

    async def _paid(self, p: Provider, paid: list[bytes] | None, head: dict) -> None:
        """Act on the first answer to a request that carried `paid`: a payment refusal raises
        billing.PaymentWait / PayDrop; an answer the host gave after taking the receipts (pieces, a
        grant) acknowledges them. Any other error may come before the host read them (`busy` for a
        stream over its limit, an unknown manifest): they stay unacknowledged and go again with the
        next request or `settle` (a receipt the host already holds is taken as a replay). Returns
        None (so the next frames of the same answer acknowledge nothing)."""
        if self.payments is not None:
            err = head.get("err") if "i" not in head else None
            if err in billing.PAYMENT_CODES:
                await self.payments.refused(p.peer, head, paid)
            if err is None:
                self.payments.acknowledged(p.peer, paid)
        return None

    def _granted(self, p: Provider, answer: dict, pieces: list[int]) -> list[int]:
        """The pieces an answer grants: the first `granted` of those asked, in request order (all
        when absent). A short answer means the host is at its credit window: pay it sooner."""
        k = answer.get("granted", len(pieces))
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= len(pieces):
            raise _Drop("protocol", f"granted {k!r} of {len(pieces)} pieces")
        granted = sorted(pieces)[:k]
        if self.payments is not None:
            self.payments.granted(p.peer, sum(self.m.piece_len(i) for i in granted), k < len(pieces))
        return granted

    async def _pay_wait(self, p: Provider) -> None:
        """A host wants payment before serving more: wait until something verified is owed to it."""
        assert self.payments is not None
        await self.payments.wait(p.peer, lambda: any(p.peer in a for a in self.in_flight.values()),
                                 lambda: self.changed.wait())  # the current event each time (no spin)

    def offer(self, p: Provider, i: int, data: bytearray | memoryview) -> None:
        """Hand a verified piece to the group writer (called from a receiving thread; blocks while
        the writer's queue is full). An endgame duplicate that lost the race, or a piece arriving
        after the fetch ended, is dropped and its buffer reused. Every verified piece is owed to
        its host, a losing duplicate too (the host sent it as asked)."""
        if self.payments is not None:
            self.payments.verified(p.peer, len(data))
        with self._lock:
            writer = self.writer  # the trio side may close it (and clear this) at any moment
            take = writer is not None and i in self.pending and i not in self.queued
            if take:
                self.queued.add(i)
                last = len(self.queued) >= len(self.pending)
        if writer is not None and take:
            if last:  # every pending piece is in the writer's hands: commit without waiting for a full group
                writer.flush()
            try:
                if writer.submit(i, data, p):
                    return
            except WriterClosedError:
                pass  # the fetch is over (or the store failed, which the fetch reports)
            with self._lock:
                self.queued.discard(i)
        self._recycle(data)
        self._soon(self._release, p, [i])

    def _written(self, i: int, data: Buffer) -> None:
        """The writer is done with a piece's buffer (writer thread): `on_verified`, then reuse it. An
        `on_verified` that fails is logged and not called again (the store still gets every piece, so
        its reader falls back to reading them from there)."""
        if self.on_verified is not None:
            try:
                self.on_verified(i, data)
            except Exception:  # noqa: BLE001 - an optimisation's failure must not fail the fetch
                log.exception("on_verified failed for piece %d; not called again in this fetch", i)
                self.on_verified = None
        self._recycle(data)

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the trio side, without waiting (from any thread)."""
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn, *args)

    def _recycle(self, data: bytearray | memoryview) -> None:
        """Give a bulk receive buffer back for reuse (stream reads allocate their own)."""
        if (isinstance(data, memoryview) and isinstance(data.obj, bytearray | mmap.mmap)
                and len(data.obj) == self.m.piece_size):
            self.buffers.put(data.obj)

    def _committed(self, batch: list[Written]) -> None:
        """A group is durable and marked present (trio side)."""
        for w in batch:
            p: Provider = w.tag
            with self._lock:
                self.queued.discard(w.index)
                new = w.index in self.pending
                self.pending.discard(w.index)
            if new:
                self.fetched += 1
                self.bytes += w.size
                p.pieces += 1
                p.bytes += w.size
                if self.on_piece:
                    self.on_piece(self.total - len(self.pending), self.total)
            self.in_flight.pop(w.index, None)
            self.asked_at.pop(w.index, None)
        self._wake()

    def _failed(self, exc: Exception) -> None:
        """The store write failed (a full disk): the fetch ends with that error."""
        if self.failure is None:
            self.failure = exc
        self._wake()

    async def _open_writer(self) -> GroupWriter:
        reserve = sum(self.m.piece_len(i) for i in self.pending)
        return await self.runner.call(partial(
            self.runner.store.group_writer, self.sm.id, reserve, group=WRITE_BATCH, queue_pieces=WRITE_QUEUE,
            on_commit=partial(self._soon, self._committed), on_written=self._written,
            on_failure=partial(self._soon, self._failed)))

    async def _close_writer(self) -> None:
        """Commit what was written and stop the writer; a failure it saw becomes the fetch's."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(writer.close)
            except Exception as exc:  # noqa: BLE001 - a full store ends the fetch with its error
                if self.failure is None:
                    self.failure = exc
            self.store_timers = dict(writer.timers)

    # -- bulk -----------------------------------------------------------------------------------

    async def _serve_from(self, p: Provider) -> None:
        """Fetch what `p` can give: over bulk when asked for and `p` supports it, else on `window`
        concurrent `pieces` streams."""
        if self.bulk is not None:
            try:
                if await self._bulk_sessions(p):
                    return
            except (_Drop, billing.PayDrop) as exc:
                self._drop(p, exc.reason, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - resets, a vanished peer: unusable now
                self._drop(p, "unreachable", repr(exc))
                return
        async with trio.open_nursery() as nursery:
            for _ in range(self.window):
                nursery.start_soon(self._worker, p)

    async def _next_pieces(self, p: Provider) -> list[int]:
        """The next bulk grant's pieces for `p`, waiting while others hold what it could send;
        [] once nothing is left for it."""
        while self.pending and p.dropped is None and self._obtainable():
            pieces = self._take(p, bulk=True)
            if pieces:
                return pieces
            if not any(i in p.have for i in self.pending):
                break
            await self._wait_changed(p)
        return []

    async def _bulk_sessions(self, p: Provider) -> bool:
        """Bulk connections to `p`, one at a time, until nothing is left for it; False (before any
        piece was taken from it over bulk) if its bulk path cannot be set up: fall back to streams."""
        while True:
            pieces = await self._next_pieces(p)
            if not pieces:
                return True
            try:
                answer, host, granted = await self._request_grant(p, pieces)
            except billing.PaymentWait:
                self._release(p, pieces)
                await self._pay_wait(p)
                continue
            except (_Drop, billing.PayDrop):
                self._release(p, pieces)
                raise
            except Exception as exc:  # noqa: BLE001 - not supported, a reset: try the streams
                self._release(p, pieces)
                return self._fallback(p, f"no bulk grant ({_short(exc)})")
            try:
                conn = await trio.to_thread.run_sync(BulkConnection, host, answer["port"], self.bulk,
                                                     answer["fingerprint"], self.timeout)
            except bulk_wire.BulkError as exc:
                self._release(p, pieces)
                return self._fallback(p, str(exc))
            self._release(p, [i for i in pieces if i not in granted])  # not granted: back to the pool
            p.path = f"bulk-{self.bulk}"
            await _BulkSession(self, p, conn).run(ClientGrant(answer["token"], granted))
            if p.dropped is not None:
                return True

    def _fallback(self, p: Provider, why: str) -> bool:
        if p.path != "streams":  # bulk worked before in this fetch: a failure now is the provider's
            raise _Drop("protocol", f"bulk path failed: {why}")
        log.info("provider %s: bulk path unavailable, using libp2p streams: %s", p.peer, why)
        return False

    async def _request_grant(self, p: Provider, pieces: list[int]) -> tuple[dict, str, list[int]]:
        """Ask `p` for a bulk grant of `pieces`; its answer, the host to connect to and the pieces
        granted (a prefix: the caller releases the rest). An error frame or a malformed answer is
        `_Drop`; failing to open the stream is not (no bulk here)."""
        t0 = trio.current_time()
        with trio.fail_after(self.timeout):
            stream = await self._open(p, bulk_wire.BULK_PROTOCOL)
        try:
            paid = await self._receipts(p)
            with trio.fail_after(self.timeout):
                await wire.write_frame(stream, {"v": wire.PROTOCOL_VERSION, "manifest": self.sm.id,
                                                "ranges": _ranges(pieces), "mode": self.bulk, "receipt": paid})
                answer = await wire.read_frame(stream, wire.MAX_REQUEST)
            p.grant_rtt = max(trio.current_time() - t0, RTT_DECAY * p.grant_rtt)  # a slow one counts a while
            await self._paid(p, paid, answer)
            if "err" in answer:
                reason = "refused" if answer.get("err") in wire.LOAD_CODES else "protocol"
                raise _Drop(reason, f"peer refused a bulk grant: {answer.get('err')} {answer.get('msg', '')}")
            wire.field(answer, "token", bytes, size=bulk_wire.TOKEN_BYTES)
            wire.field(answer, "fingerprint", bytes, size=bulk_wire.FINGERPRINT_BYTES)
            port = wire.field(answer, "port", int)
            host = wire.field(answer, "host", str)
            if not 0 < port < 65536:
                raise _Drop("protocol", f"bulk grant with port {port}")
            if not host:  # "": the address this peer is reached at over libp2p
                remote = stream.get_remote_address()
                if not remote:
                    raise _Drop("protocol", "bulk grant without a host, and no remote address known")
                host = remote[0]
            return answer, host, self._granted(p, answer, pieces)
        except wire.WireError as exc:
            raise _Drop("protocol", str(exc)) from exc
        except trio.TooSlowError as exc:
            raise _Drop("timeout", f"no bulk grant within {self.timeout} s") from exc
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _worker(self, p: Provider) -> None:
        while self.pending and p.dropped is None and self._obtainable():
            pieces = self._take(p)
            if not pieces:
                if not any(i in p.have for i in self.pending):
                    return
                await self._wait_changed(p)
                continue
            try:
                try:
                    await self._request(p, pieces)
                except billing.PaymentWait:
                    await self._pay_wait(p)
            except (_Drop, billing.PayDrop) as exc:
                self._drop(p, exc.reason, str(exc))
            except Exception as exc:  # noqa: BLE001 - dial failures, resets: the peer is unusable now
                self._drop(p, "unreachable", repr(exc))

    def _drop(self, p: Provider, reason: str, detail: str) -> None:
        if p.dropped is None:
            p.dropped = reason
            # what it was asked for is open to the others at once (its late pieces still count)
            self._release(p, [i for i, askers in self.in_flight.items() if p.peer in askers])
            score = self.scores.bad(p.peer, reason)
            # A peer that went away is routine (and reported in the result); a lie is worth a warning.
            level = logging.DEBUG if reason == "unreachable" else logging.WARNING
            log.log(level, "dropping provider %s for this fetch (%s; score now %.1f): %s", p.peer, reason, score,
                    detail)
        self._wake()

    async def run(self, background: trio.Nursery | None = None) -> None:
        """Run until every piece is stored or nobody live can supply what is left.

        With a `background` nursery (a node's), requests still in flight when the fetch completes
        (endgame duplicates, a stalled peer) are left to finish or time out there: the caller gets
        its result at once, and a peer that stalled is still detected and scored down.
        """
        ordered = self.scores.rank([p.peer for p in self.providers])
        by_peer = {p.peer: p for p in self.providers}
        self.providers = [by_peer[x] for x in ordered]
        usable = [p for p in self.providers if not self.scores.avoided(p.peer)] or self.providers
        self._token = trio.lowlevel.current_trio_token()
        self.writer = await self._open_writer()
        try:
            async with trio.open_nursery() as nursery:
                if self.payments is not None:  # pays hosts as verified bytes accumulate (kvnet.p2p.billing)
                    nursery.start_soon(self.payments.pay_along, self.open_stream, self.timeout)
                for p in usable:
                    (background or nursery).start_soon(self._serve_from, p)
                await self._until_settled()
                await self._close_writer()  # late pieces from background workers are dropped
                self._wake()  # idle background workers see that nothing is pending and exit
                nursery.cancel_scope.cancel()
        finally:
            await self._close_writer()
        if self.failure is not None:
            raise self.failure

    async def _until_settled(self) -> None:
        while self.pending and self._obtainable() and self.failure is None:
            await self.changed.wait()


class _BulkSession(Handler):
    """One bulk connection to one provider: a producer requests grants over libp2p (keeping
    BULK_GRANTS_AHEAD outstanding), a receiver thread redeems them and reads their records, and a
    watcher cuts the connection as soon as the fetch is complete (cancelling endgame duplicates)."""

    def __init__(self, fetch: Fetch, p: Provider, conn: BulkConnection) -> None:
        self.f, self.p, self.conn = fetch, p, conn
        self.grants: queue.Queue = queue.Queue()
        self.slots = trio.Semaphore(BULK_GRANTS_AHEAD)
        self.left: dict[bytes, ClientGrant] = {}  # token -> granted and not done (its pieces may still come)
        self.granted = 0  # pieces of every grant queued on this connection (trio side)
        self.records = 0  # piece and missing records read (the receiver thread)
        self.low_water = -1  # >= 0 while the producer waits for `outstanding` to fall to it
        self.due = trio.Event()

    async def run(self, first: ClientGrant) -> None:
        await self.slots.acquire()
        self._queue(first)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, nursery.cancel_scope)
                nursery.start_soon(self._produce)
                nursery.start_soon(self._watch)
        finally:
            self.conn.abort()
            for g in self.left.values():
                self.f._release(self.p, _not_received(g))
            self.left.clear()

    def _queue(self, g: ClientGrant) -> None:
        self.left[g.token] = g
        self.granted += len(g.indices)
        self.grants.put(g)

    def _outstanding(self) -> int:
        """Pieces granted on this connection whose records have not been read yet."""
        return self.granted - self.records

    def _low_water_mark(self) -> int:
        """Outstanding pieces at which the next grant is asked for: what this connection receives in
        LOOKAHEAD grant round trips at its rate so far (LOW_WATER_MIN until it has a rate)."""
        rate = self.p.rate()
        if rate is None:
            return LOW_WATER_MIN
        return max(LOW_WATER_MIN, math.ceil(rate * self.p.grant_rtt * LOOKAHEAD / self.f.m.piece_size))

    async def _until_low_water(self) -> None:
        """While other live providers share the pool, wait until this connection has little left to
        receive before it takes more: what it has not taken yet can still go to whichever provider
        is ahead, and its next grant is sized to what is left then (Fetch._bulk_share)."""
        f = self.f
        while self.left and f.pending and f.failure is None and self.p.dropped is None:
            if sum(1 for q in f.providers if q.dropped is None) <= 1:
                return
            self.due = trio.Event()
            self.low_water = self._low_water_mark()
            if self._outstanding() <= self.low_water:
                break
            with trio.move_on_after(LOW_WATER_RECHECK_S):  # its rate, so its mark, changes as it goes
                await self.due.wait()
        self.low_water = -1

    async def _receive(self, scope: trio.CancelScope) -> None:
        try:
            await trio.to_thread.run_sync(self.conn.run, self.f.m, self.grants, self, self.f.buffers,
                                          abandon_on_cancel=True)
        except bulk_wire.BulkError as exc:
            self.f._drop(self.p, "protocol" if exc.reason == "unavailable" else exc.reason, str(exc))
        finally:
            scope.cancel()

    async def _produce(self) -> None:
        try:
            while True:
                await self.slots.acquire()
                await self._until_low_water()
                pieces = await self._next()
                if not pieces:
                    return
                queued = False
                try:
                    answer, _, granted = await self.f._request_grant(self.p, pieces)
                    self.f._release(self.p, [i for i in pieces if i not in granted])  # a prefix: the rest back
                    pieces = granted
                    self._queue(ClientGrant(answer["token"], granted))
                    queued = True
                except billing.PaymentWait:  # pay for what arrives from the grants still streaming
                    self.f._release(self.p, pieces)
                    queued = True
                    self.slots.release()
                    try:
                        await self.f._pay_wait(self.p)
                    except billing.PayDrop as exc:
                        self.f._drop(self.p, exc.reason, str(exc))
                        return
                    continue
                except (_Drop, billing.PayDrop) as exc:  # e.g. over its budget: what is already granted still comes
                    self.f._drop(self.p, exc.reason, str(exc))
                    return
                except Exception as exc:  # noqa: BLE001 - a reset, a vanished peer
                    self.f._drop(self.p, "unreachable", repr(exc))
                    return
                finally:
                    if not queued:  # cancelled included: these pieces go back to the pool
                        self.f._release(self.p, pieces)
        finally:
            self.grants.put(None)  # the receiver ends once every queued grant is done

    async def _next(self) -> list[int]:
        """The next grant's pieces; [] when none is due and nothing is outstanding (the session
        ends; a new one starts if more becomes obtainable from this provider)."""
        f, p = self.f, self.p
        while f.pending and p.dropped is None and f._obtainable() and f.failure is None:
            pieces = f._take(p, bulk=True)
            if pieces or not self.left:
                return pieces
            await f._wait_changed(p)
        return []

    async def _watch(self) -> None:
        while self.f.pending and self.f.failure is None:
            await self.f.changed.wait()
        self.conn.abort()

    # -- called from the receiver thread --------------------------------------------------------

    def piece(self, grant: ClientGrant, index: int, data: memoryview) -> None:
        """Straight to the store's writer from this thread (no trio round trip per piece)."""
        self.p.progress(len(data))  # only this provider's receiver thread adds to it
        self._record_read()
        self.f.offer(self.p, index, data)

    def missing(self, grant: ClientGrant, index: int) -> None:
        self._record_read()
        self.f._soon(self._missing, grant, index)  # no round trip: the receiver reads on at once

    def _record_read(self) -> None:
        """Count a record; wake the producer (once) when the outstanding pieces reach its mark."""
        self.records += 1
        mark = self.low_water
        if mark >= 0 and self.granted - self.records <= mark:
            self.low_water = -1
            self.f._soon(self._wake_producer)

    def _wake_producer(self) -> None:
        self.due.set()

    def done(self, grant: ClientGrant) -> None:
        # queued, not waited for: the receiver goes straight to the next grant's records (a blocking
        # round trip to the trio loop here was 2-4 ms of idle connection per grant); trio runs it
        # before it learns that the receiver thread ended (one FIFO queue)
        self.f._soon(self._done, grant)

    def _missing(self, grant: ClientGrant, index: int) -> None:
        self.p.have.discard(index)
        self.p.missing += 1
        self.f._release(self.p, [index])

    def _done(self, grant: ClientGrant) -> None:
        if self.left.pop(grant.token, None) is not None:
            self.f._release(self.p, _not_received(grant))
        self.slots.release()
        self.f._wake()


def _not_received(g: ClientGrant) -> list[int]:
    """A grant's pieces that did not arrive (those that did are the writer's, or were released)."""
    got = set(g.received)  # a copy: the receiver thread may still append
    return [i for i in g.indices if i not in got]


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ranges(pieces: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(pieces):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


async def fetch_pieces(signed: SignedManifest, needed: list[int], providers: list[Provider], runner: StoreRunner,
                       open_stream: OpenStream, scores: PeerScores, background: trio.Nursery | None = None,
                       **kw: Any) -> FetchResult:
    """Fetch `needed` pieces (minus those already stored) from `providers`; raise FetchError if incomplete."""
    t0 = time.perf_counter()
    have = await runner.call(runner.store.present_pieces, signed.id)
    todo = [i for i in needed if i not in have]
    f = Fetch(signed, todo, providers, runner, open_stream, scores, **kw)
    if todo:
        await f.run(background)
    seconds = time.perf_counter() - t0
    for p in f.providers:
        if p.dropped is None and p.pieces:
            scores.good(p.peer, p.pieces)
        elif p.missing and not p.pieces:  # offered pieces, then served none of them: a phantom offer
            scores.bad(p.peer, "phantom")
    stats = {p.peer: {"pieces": p.pieces, "bytes": p.bytes, "dropped": p.dropped} for p in f.providers}
    if f.pending:
        raise FetchError(f"{len(f.pending)} of {len(todo)} pieces could not be fetched "
                         f"(providers: {stats})")
    return FetchResult(signed.id, f.fetched, len(needed) - len(todo), f.bytes, seconds, stats,
                       sum(p.received for p in f.providers), {p.peer: p.path for p in f.providers},
                       f.store_timers)
