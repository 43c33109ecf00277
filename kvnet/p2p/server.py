"""Serving side of `/kvnet/offer/1.0.0` and `/kvnet/pieces/1.0.0` (docs/protocol.md).

One request per stream: the server reads one request frame, answers, and closes its side. Handlers
never let an exception escape: a peer that sends garbage gets an error frame (or a reset stream) and
the node keeps serving everyone else. Store calls run in a worker thread, one at a time, so disk I/O
and hashing never stall the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from kvnet.manifest import SignedManifest
from kvnet.p2p import billing, wire
from kvnet.pieces import ArtifactError
from kvnet.store import NotFoundError, Store

OFFER_PROTOCOL = "/kvnet/offer/1.0.0"
PIECES_PROTOCOL = "/kvnet/pieces/1.0.0"
REQUEST_TIMEOUT = 10.0
MAX_OFFERS = 8
MAX_PIECES_PER_REQUEST = 64
MAX_RANGES = 16
# The fields a v1 request may carry (docs/protocol.md). Anything else is `malformed`: a v1 server that
# ignored a field it does not know could silently drop a condition the client meant (a later
# protocol version adds fields under a new `v`).
OFFER_FIELDS = frozenset({"v", "key", "receipt"})
PIECES_FIELDS = frozenset({"v", "manifest", "ranges", "receipt"})
# Serving limits per peer (docs/protocol.md "Limits", docs/security.md). A kvnet fetch keeps at most 4
# pieces requests in flight per provider, so 8 streams leave room for two fetches from one node.
MAX_PIECES_STREAMS_PER_PEER = 8
SERVE_BYTES_PER_PEER = 1 << 30  # piece bytes one peer may draw per SERVE_WINDOW_S (1 GiB/min)
SERVE_WINDOW_S = 60.0
PEER_USE_PRUNE_AT = 1024  # idle per-peer entries are dropped once this many are tracked

log = logging.getLogger("kvnet.p2p.server")
T = TypeVar("T")


class StoreRunner:
    """Runs store calls in a worker thread, serialized (SQLite connection + disk I/O off the loop)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.limiter = trio.CapacityLimiter(1)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


@dataclass
class HostingTerms:
    """What this node charges for hosting (payments will enforce it; the protocol already carries it)."""

    fee_per_mib: int = 0
    currency: str = "USD"


def stream_peer(stream: Any) -> str:
    """The base58 peer id at the far end of a libp2p stream ("?" if unknown), for logs and limits."""
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:  # noqa: BLE001 - a stream without a peer id
        return "?"


async def _finish(stream: Any, ok: bool) -> None:
    try:
        if ok:
            await stream.close()
        else:
            await stream.reset()
    except Exception:  # noqa: BLE001 - the peer may be gone already
        pass


@dataclass
class ServeLimits:
    """What one peer may take from this node's pieces server (identities are free, so these bound
    the cost of one identity; the connection limits bound how many a node talks to at once)."""

    streams_per_peer: int = MAX_PIECES_STREAMS_PER_PEER
    bytes_per_window: int = SERVE_BYTES_PER_PEER
    window_s: float = SERVE_WINDOW_S


@dataclass
class _PeerUse:
    """One peer's open pieces streams and its byte budget: a token bucket holding up to
    `bytes_per_window`, refilled evenly over `window_s` (so a peer never gets more than that in any
    window, plus what refills during it)."""

    tokens: float
    stamp: float
    streams: int = 0


class PieceServer:
    def __init__(self, runner: StoreRunner, terms: HostingTerms | None = None,
                 request_timeout: float = REQUEST_TIMEOUT, limits: ServeLimits | None = None,
                 on_abuse: Callable[[str, str], Any] | None = None) -> None:
        """`on_abuse(peer, code)` is called on every refusal of a peer for going over a limit; a node
        scores that peer down with it, at most once per limit window
        (kvnet.p2p.scores.PeerScores.bad_at_most_every), so refusals in bulk cost no disk writes."""
        self.runner = runner
        self.terms = terms or HostingTerms()
        self.request_timeout = request_timeout
        self.limits = limits or ServeLimits()
        self.on_abuse = on_abuse
        self.served_pieces = 0
        self.served_bytes = 0
        self.refused: dict[str, int] = {}  # error code -> refusals for a serving limit (busy, rate_limited)
        self._use: dict[str, _PeerUse] = {}
        self.biller: billing.Biller | None = None  # payments (kvnet.p2p.billing); set by the node

    # -- payments (kvnet.p2p.billing) -----------------------------------------------------------

    async def bill(self, peer: str, sm: SignedManifest, sizes: list[int], req: dict) -> int:
        """Take the request's receipts and grant the prefix of its pieces (`sizes`, in request order)
        that fits the credit window: how many; or raise the WireError to answer (`pieces` and `bulk`
        alike). Without a biller, receipts are refused."""
        raw = billing.receipts_field(req)
        if self.biller is None:
            if raw:
                raise wire.WireError("malformed", "receipt must be nil: this node takes no payments")
            return len(sizes)
        return await self.biller.admit(peer, sm, sizes, raw)

    def unbill(self, peer: str, granted: int, unsent: int) -> None:
        """A granted request is over, `unsent` of its `granted` bytes not sent after all (thread-safe)."""
        if self.biller is not None:
            self.biller.finished(peer, granted, unsent)

    async def handle_receipts(self, stream: Any) -> None:
        await self.guard(stream, "receipts", self._receipts)

    async def _receipts(self, stream: Any) -> None:
        req = await self.read_request(stream, billing.RECEIPTS_FIELDS, paid=True)
        if self.biller is None:
            raise wire.WireError("malformed", "this node takes no payments")
        await wire.write_frame(stream, await self.biller.handle(stream_peer(stream), req))

    # -- per-peer limits ------------------------------------------------------------------------

    def _peer_use(self, peer: str) -> _PeerUse:
        now = trio.current_time()
        use = self._use.get(peer)
        if use is None:
            if len(self._use) >= PEER_USE_PRUNE_AT:
                self._prune(now)
            use = self._use[peer] = _PeerUse(float(self.limits.bytes_per_window), now)
        cap = float(self.limits.bytes_per_window)
        use.tokens = min(cap, use.tokens + (now - use.stamp) * cap / self.limits.window_s)
        use.stamp = now
        return use

    def _prune(self, now: float) -> None:
        """Forget peers with no open stream whose budget has refilled: they are indistinguishable
        from new ones, so the table stays bounded however many identities come and go."""
        cap = float(self.limits.bytes_per_window)
        for peer, use in list(self._use.items()):
            if use.streams == 0 and use.tokens + (now - use.stamp) * cap / self.limits.window_s >= cap:
                del self._use[peer]

    def refuse(self, peer: str, code: str, msg: str) -> wire.WireError:
        """Count and score a refusal of `peer` for a serving limit (the bulk path's too)."""
        return self._refuse(peer, self._peer_use(peer), code, msg)

    def _refuse(self, peer: str, use: _PeerUse, code: str, msg: str) -> wire.WireError:
        self.refused[code] = self.refused.get(code, 0) + 1
        if self.on_abuse is not None:
            try:
                self.on_abuse(peer, code)
            except Exception as exc:  # noqa: BLE001 - scoring must never break serving
                log.debug("scoring %s failed: %r", peer, exc)
        return wire.WireError(code, msg)

    async def guard(self, stream: Any, name: str, body: Callable[[Any], Any]) -> None:
        """Run a handler body; turn every failure into an error frame or a reset, never an escape
        (shared with the bulk request handler, kvnet.p2p.bulk_server)."""
        ok = False
        try:
            await body(stream)
            ok = True
        except wire.WireError as exc:
            log.info("%s from %s: %s", name, stream_peer(stream), exc)
            if exc.code in wire.ERROR_CODES:
                ok = await self._try_send(stream, wire.error(exc.code, exc.msg, **exc.extra))
            # else the stream itself failed (reset by the peer): nothing to answer, reset it
        except trio.TooSlowError:
            log.info("%s from %s: request timed out", name, stream_peer(stream))
            ok = await self._try_send(stream, wire.error("timeout", "no complete request in time"))
        except Exception as exc:  # noqa: BLE001 - a handler must never leak an exception
            log.warning("%s from %s failed: %r", name, stream_peer(stream), exc)
            ok = await self._try_send(stream, wire.error("internal", type(exc).__name__))
        finally:
            await _finish(stream, ok)  # close if the peer can still read our answer, else reset

    @staticmethod
    async def _try_send(stream: Any, msg: dict) -> bool:
        try:
            with trio.move_on_after(2):
                await wire.write_frame(stream, msg)
                return True
        except Exception:  # noqa: BLE001 - the peer is gone or reset the stream
            pass
        return False

    async def read_request(self, stream: Any, allowed: frozenset[str], paid: bool = False) -> dict:
        """The one request frame of a stream, within the request timeout and size limit, with the
        fields every request shares checked: `v` must be 1; `receipt` nil or absent unless the
        request is `paid` (pieces, bulk, receipts: then nil or an array of receipts, checked by
        kvnet.p2p.billing.receipts_field), and no field outside `allowed`."""
        try:
            with trio.fail_after(self.request_timeout):
                req = await wire.read_frame(stream, wire.MAX_REQUEST)
        except wire.WireError as exc:
            if exc.code == "eof":  # the peer closed its side mid-request; it may still read the answer
                raise wire.WireError("malformed", f"incomplete request: {exc.msg}") from exc
            raise
        if req.get("v") != wire.PROTOCOL_VERSION:
            raise wire.WireError("malformed", f"unsupported version {req.get('v')!r} (this node speaks 1)")
        if paid:
            billing.receipts_field(req)
        elif req.get("receipt") is not None:
            raise wire.WireError("malformed", "receipt must be nil in this request")
        unknown = sorted(set(req) - allowed)
        if unknown:
            raise wire.WireError("malformed", f"unknown fields {unknown[:4]!r}")
        return req

    # -- /kvnet/offer/1.0.0 ---------------------------------------------------------------------

    async def handle_offer(self, stream: Any) -> None:
        await self.guard(stream, "offer", self._offer)

    async def _offer(self, stream: Any) -> None:
        req = await self.read_request(stream, OFFER_FIELDS)
        key = wire.field(req, "key", bytes, size=32)
        offers = await self.runner.call(self._offers_for, key)
        await wire.write_frame(stream, {
            "v": wire.PROTOCOL_VERSION, "offers": offers,
            "fee_per_mib": self.terms.fee_per_mib, "currency": self.terms.currency,
        })

    def _offers_for(self, key: bytes) -> list[dict]:
        store = self.runner.store
        out = []
        for mid in store.manifests_for_key(key, MAX_OFFERS):
            try:
                sm = store.get_manifest(mid)
            except NotFoundError:
                continue
            have = store.present_pieces(mid)
            out.append({"manifest": sm.raw, "have": wire.bitfield(have, len(sm.manifest.pieces))})
        return out

    # -- /kvnet/pieces/1.0.0 --------------------------------------------------------------------

    async def handle_pieces(self, stream: Any) -> None:
        await self.guard(stream, "pieces", self._pieces_limited)

    async def _pieces_limited(self, stream: Any) -> None:
        """`_pieces` within the peer's stream limit (checked when the stream opens, before the
        request is read: a peer holding its streams open idle is refused as well)."""
        peer = stream_peer(stream)
        use = self._peer_use(peer)
        if use.streams >= self.limits.streams_per_peer:
            raise self._refuse(peer, use, "busy", f"at most {self.limits.streams_per_peer} pieces streams per peer")
        use.streams += 1
        try:
            await self._pieces(stream)
        finally:
            use.streams -= 1

    def _charge(self, stream: Any, n: int) -> None:
        """Take `n` bytes from the peer's budget, or refuse with `rate_limited` (before the piece is
        sent: the error frame takes the place of its header)."""
        self.charge(stream_peer(stream), n)

    def charge(self, peer: str, n: int) -> None:
        """Take `n` bytes from `peer`'s budget or raise `rate_limited`; `pieces` charges each piece
        before sending it, `bulk` a whole grant when issuing it (one budget for both paths)."""
        use = self._peer_use(peer)
        if use.tokens < n:
            raise self._refuse(peer, use, "rate_limited",
                               f"over {self.limits.bytes_per_window} bytes per {self.limits.window_s:g} s")
        use.tokens -= n

    def charge_prefix(self, peer: str, sizes: list[int]) -> int:
        """Take from `peer`'s budget the longest prefix of `sizes` that fits: how many pieces (a bulk
        grant over the budget is answered with the part that fits); `rate_limited` if not even one."""
        use = self._peer_use(peer)
        k, total = 0, 0
        for n in sizes:
            if total + n > use.tokens:
                break
            total, k = total + n, k + 1
        if k == 0:
            raise self._refuse(peer, use, "rate_limited",
                               f"over {self.limits.bytes_per_window} bytes per {self.limits.window_s:g} s")
        use.tokens -= total
        return k

    async def resolve(self, req: dict) -> tuple[SignedManifest, list[int]]:
        """The manifest and piece indices a checked request asks for (`manifest`, then `ranges`, the
        manifest lookup, the indices against it, in the order docs/protocol.md gives), or the
        WireError to answer. Shared by `pieces` and `bulk`."""
        mid = wire.field(req, "manifest", bytes, size=32)
        indices = piece_indices(wire.field(req, "ranges", list))
        try:
            sm = await self.runner.call(self.runner.store.get_manifest, mid)
        except NotFoundError as exc:
            raise wire.WireError("unknown_manifest", f"no manifest {mid.hex()[:16]} here") from exc
        n = len(sm.manifest.pieces)
        if max(indices) >= n:
            raise wire.WireError("bad_range", f"piece index {max(indices)} past the end ({n} pieces)")
        return sm, indices

    async def _pieces(self, stream: Any) -> None:
        req = await self.read_request(stream, PIECES_FIELDS, paid=True)
        sm, indices = await self.resolve(req)
        mid = sm.id
        peer = stream_peer(stream)
        sizes = [sm.manifest.piece_len(i) for i in indices]
        k = await self.bill(peer, sm, sizes, req)  # a prefix of the pieces within the credit window
        granted = unsent = sum(sizes[:k])
        try:
            for i in indices[:k]:
                try:
                    data = await self.runner.call(self.runner.store.read_piece, mid, i)
                except (NotFoundError, ArtifactError):  # evicted, or found corrupt and dropped by the store
                    await wire.write_frame(stream, {"i": i, "err": "missing"})
                    continue
                self._charge(stream, len(data))
                await wire.write_frame(stream, {"i": i, "n": len(data)})
                await stream.write(bytes(data))
                unsent -= sm.manifest.piece_len(i)
                self.served_pieces += 1
                self.served_bytes += len(data)
            await wire.write_frame(stream, {"done": True} if k == len(indices) else {"done": True, "granted": k})
        finally:
            self.unbill(peer, granted, unsent)  # what was granted and not sent is not owed


def piece_indices(ranges: list) -> list[int]:
    """The piece indices a `ranges` field asks for, in request order, or the WireError the spec
    names (docs/protocol.md, "pieces"). Each index is asked for at most once: overlapping or repeated
    ranges are refused, so a peer cannot make the server send the same bytes over and over."""
    if not ranges:
        raise wire.WireError("bad_range", "a request needs at least one range")
    if len(ranges) > MAX_RANGES:
        raise wire.WireError("too_large", f"{len(ranges)} ranges; at most {MAX_RANGES} per request")
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r) or not 0 <= r[0] < r[1]):
            raise wire.WireError("bad_range", "a range is [start, end) of two integers with 0 <= start < end")
    total = sum(end - start for start, end in ranges)
    if total > MAX_PIECES_PER_REQUEST:
        raise wire.WireError("too_large", f"{total} pieces; at most {MAX_PIECES_PER_REQUEST} per request")
    ordered = sorted(ranges)
    for (_, prev_end), (start, _) in zip(ordered, ordered[1:], strict=False):
        if start < prev_end:
            raise wire.WireError("bad_range", "ranges overlap: each piece may be asked for once")
    return [i for start, end in ranges for i in range(start, end)]
