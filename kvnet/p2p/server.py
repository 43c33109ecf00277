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

from kvnet.p2p import wire
from kvnet.pieces import ArtifactError
from kvnet.store import NotFoundError, Store

OFFER_PROTOCOL = "/kvnet/offer/1.0.0"
PIECES_PROTOCOL = "/kvnet/pieces/1.0.0"
REQUEST_TIMEOUT = 10.0
MAX_OFFERS = 8
MAX_PIECES_PER_REQUEST = 64
MAX_RANGES = 16

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


def _peer(stream: Any) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:  # noqa: BLE001 - only for logs
        return "?"


async def _finish(stream: Any, ok: bool) -> None:
    try:
        if ok:
            await stream.close()
        else:
            await stream.reset()
    except Exception:  # noqa: BLE001 - the peer may be gone already
        pass


class PieceServer:
    def __init__(self, runner: StoreRunner, terms: HostingTerms | None = None,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.runner = runner
        self.terms = terms or HostingTerms()
        self.request_timeout = request_timeout
        self.served_pieces = 0
        self.served_bytes = 0

    async def _guard(self, stream: Any, name: str, body: Callable[[Any], Any]) -> None:
        """Run a handler body; turn every failure into an error frame or a reset, never an escape."""
        ok = False
        try:
            await body(stream)
            ok = True
        except wire.WireError as exc:
            log.info("%s from %s: %s", name, _peer(stream), exc)
            if exc.code in wire.ERROR_CODES:
                ok = await self._try_send(stream, wire.error(exc.code, exc.msg))
            # else the stream itself failed (reset by the peer): nothing to answer, reset it
        except trio.TooSlowError:
            log.info("%s from %s: request timed out", name, _peer(stream))
            ok = await self._try_send(stream, wire.error("timeout", "no complete request in time"))
        except Exception as exc:  # noqa: BLE001 - a handler must never leak an exception
            log.warning("%s from %s failed: %r", name, _peer(stream), exc)
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

    async def _read_request(self, stream: Any) -> dict:
        """The one request frame of a stream, within the request timeout and size limit, with the
        fields every request shares checked: `v` must be 1 and `receipt` nil or absent (receipts
        are reserved for payments; a v1 server cannot honour one, so it refuses rather than ignore it)."""
        try:
            with trio.fail_after(self.request_timeout):
                req = await wire.read_frame(stream, wire.MAX_REQUEST)
        except wire.WireError as exc:
            if exc.code == "eof":  # the peer closed its side mid-request; it may still read the answer
                raise wire.WireError("malformed", f"incomplete request: {exc.msg}") from exc
            raise
        if req.get("v") != wire.PROTOCOL_VERSION:
            raise wire.WireError("malformed", f"unsupported version {req.get('v')!r} (this node speaks 1)")
        if req.get("receipt") is not None:
            raise wire.WireError("malformed", "receipt must be nil: payments are not supported yet")
        return req

    # -- /kvnet/offer/1.0.0 ---------------------------------------------------------------------

    async def handle_offer(self, stream: Any) -> None:
        await self._guard(stream, "offer", self._offer)

    async def _offer(self, stream: Any) -> None:
        req = await self._read_request(stream)
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
        await self._guard(stream, "pieces", self._pieces)

    async def _pieces(self, stream: Any) -> None:
        req = await self._read_request(stream)
        mid = wire.field(req, "manifest", bytes, size=32)
        indices = piece_indices(wire.field(req, "ranges", list))
        try:
            sm = await self.runner.call(self.runner.store.get_manifest, mid)
        except NotFoundError as exc:
            raise wire.WireError("unknown_manifest", f"no manifest {mid.hex()[:16]} here") from exc
        n = len(sm.manifest.pieces)
        if max(indices) >= n:
            raise wire.WireError("bad_range", f"piece index {max(indices)} past the end ({n} pieces)")
        for i in indices:
            try:
                data = await self.runner.call(self.runner.store.read_piece, mid, i)
            except (NotFoundError, ArtifactError):  # evicted, or found corrupt and dropped by the store
                await wire.write_frame(stream, {"i": i, "err": "missing"})
                continue
            await wire.write_frame(stream, {"i": i, "n": len(data)})
            await stream.write(bytes(data))
            self.served_pieces += 1
            self.served_bytes += len(data)
        await wire.write_frame(stream, {"done": True})

    @staticmethod
    def _indices(ranges: list) -> list[int]:
        """The same as `piece_indices` (kept for subclasses in tests that serve pieces their own way)."""
        return piece_indices(ranges)


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
