"""Parallel, multi-provider, verified piece fetching.

Pieces are assigned across providers in batches; each provider gets `window` concurrent requests
(pipelining). When nothing is left to assign, idle workers re-request pieces still in flight
elsewhere (endgame), and the first verified copy wins. Each received piece is checked (length, then
BLAKE3 against the signed manifest) as soon as it is read, so a liar is dropped before it can be sent
another request; verified pieces go to one writer task that stores them in group commits
(`Store.put_pieces`, without hashing them again), off the event loop. A provider that sends a bad piece, a
wrong length, a protocol violation or nothing before the timeout is dropped for this fetch, scored
down persistently, gets no further request in this fetch, and its pieces go back to the pool.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from kvnet.errors import NetworkError
from kvnet.manifest import SignedManifest
from kvnet.p2p import wire
from kvnet.p2p.scores import PeerScores
from kvnet.p2p.server import PIECES_PROTOCOL, StoreRunner
from kvnet.pieces import ArtifactError, verify_piece

log = logging.getLogger("kvnet.p2p.fetcher")

OpenStream = Callable[[str, str], Awaitable[Any]]
WRITE_QUEUE = 32  # received pieces waiting for the writer (bounds memory: 32 MiB with 1 MiB pieces)
WRITE_BATCH = 16  # pieces per group commit


class FetchError(NetworkError):
    """The fetch could not complete: every provider failed or nobody has some pieces."""


@dataclass
class Provider:
    peer: str  # base58 peer id
    have: set[int]
    dropped: str | None = None  # why, once dropped
    pieces: int = 0
    bytes: int = 0


@dataclass
class FetchResult:
    manifest_id: bytes
    fetched: int
    already_had: int
    bytes: int
    seconds: float
    providers: dict[str, dict] = field(default_factory=dict)

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
                 timeout: float = 10.0, on_piece: Callable[[int, int], None] | None = None) -> None:
        self.sm, self.m = signed, signed.manifest
        self.pending = set(needed)
        self.total = len(self.pending)
        self.providers = providers
        self.runner, self.open_stream, self.scores = runner, open_stream, scores
        self.window, self.batch, self.timeout = window, batch, timeout
        self.on_piece = on_piece
        self.in_flight: dict[int, set[str]] = {}  # piece -> peers asked for it
        self.changed = trio.Event()
        self.fetched = 0
        self.bytes = 0
        self.queued: set[int] = set()  # received, waiting for the writer
        self.failure: Exception | None = None
        self.to_writer, self._writer_rx = trio.open_memory_channel(WRITE_QUEUE)

    # -- assignment -----------------------------------------------------------------------------

    def _take(self, p: Provider) -> list[int]:
        """Next batch for `p`: unassigned pieces it has, else (endgame) pieces in flight elsewhere."""
        fresh = sorted(i for i in self.pending if i in p.have and i not in self.in_flight)[: self.batch]
        if not fresh:  # endgame: duplicate a little of what others are still sending
            fresh = sorted(i for i in self.pending if i in p.have and p.peer not in self.in_flight.get(i, ()))
            fresh = fresh[: max(1, self.batch // 4)]
        for i in fresh:
            self.in_flight.setdefault(i, set()).add(p.peer)
        return fresh

    def _release(self, p: Provider, pieces: list[int]) -> None:
        for i in pieces:
            askers = self.in_flight.get(i)
            if askers is not None:
                askers.discard(p.peer)
                if not askers:
                    del self.in_flight[i]
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _obtainable(self) -> bool:
        """Is some pending piece queued for writing or held by a live provider?"""
        live = [p for p in self.providers if p.dropped is None]
        return any(i in self.queued or any(i in p.have for p in live) for i in self.pending)

    # -- transfer -------------------------------------------------------------------------------

    async def _request(self, p: Provider, pieces: list[int]) -> None:
        """Ask `p` for `pieces` on one stream and store what verifies."""
        remaining = set(pieces)
        with trio.fail_after(self.timeout):
            stream = await self.open_stream(p.peer, PIECES_PROTOCOL)
        try:
            ranges = _ranges(pieces)
            with trio.fail_after(self.timeout):
                await wire.write_frame(stream, {"v": wire.PROTOCOL_VERSION, "manifest": self.sm.id,
                                                "ranges": ranges, "receipt": None})
            while True:
                with trio.fail_after(self.timeout):
                    head = await wire.read_frame(stream, wire.MAX_REQUEST)
                if head.get("done") is True:
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
                try:  # caught here, before this peer is sent another request
                    verify_piece(self.m, i, data)
                except ArtifactError as exc:
                    raise _Drop("bad_piece", str(exc)) from exc
                await self._accept(p, i, data)  # handed to the writer, which stores it
                remaining.discard(i)
            if remaining:
                raise _Drop("protocol", f"stream ended without pieces {sorted(remaining)[:5]}")
        except wire.WireError as exc:
            raise _Drop("protocol", str(exc)) from exc
        except trio.TooSlowError as exc:
            raise _Drop("timeout", f"no data within {self.timeout} s") from exc
        finally:
            self._release(p, sorted(remaining))
            with contextlib.suppress(Exception):
                await stream.close()

    async def _accept(self, p: Provider, i: int, data: bytearray) -> None:
        """Queue a verified piece for the writer, which stores pieces in group commits."""
        if i not in self.pending or i in self.queued:  # an endgame duplicate that lost the race
            self._release(p, [i])
            return
        self.queued.add(i)
        try:
            await self.to_writer.send((p, i, data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.queued.discard(i)  # the fetch is over; this late copy is not needed

    async def _writer(self, rx: trio.MemoryReceiveChannel) -> None:
        """Store received (already verified) pieces in group commits."""
        async with rx:
            async for first in rx:
                batch = [first]
                while len(batch) < WRITE_BATCH:
                    try:
                        batch.append(rx.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:
                    await self.runner.call(self.runner.store.put_pieces, self.sm.id,
                                           [(i, d) for _, i, d in batch], True)
                except Exception as exc:  # noqa: BLE001 - a full store ends the fetch with its error
                    self.failure = exc
                    self._wake()
                    return
                for p, i, data in batch:
                    self.queued.discard(i)
                    if i in self.pending:
                        self.pending.discard(i)
                        self.fetched += 1
                        self.bytes += len(data)
                        p.pieces += 1
                        p.bytes += len(data)
                        if self.on_piece:
                            self.on_piece(self.total - len(self.pending), self.total)
                    self.in_flight.pop(i, None)
                self._wake()

    async def _worker(self, p: Provider) -> None:
        while self.pending and p.dropped is None and self._obtainable():
            pieces = self._take(p)
            if not pieces:
                if not any(i in p.have for i in self.pending):
                    return
                await self.changed.wait()
                continue
            try:
                await self._request(p, pieces)
            except _Drop as exc:
                self._drop(p, exc.reason, str(exc))
            except Exception as exc:  # noqa: BLE001 - dial failures, resets: the peer is unusable now
                self._drop(p, "unreachable", repr(exc))

    def _drop(self, p: Provider, reason: str, detail: str) -> None:
        if p.dropped is None:
            p.dropped = reason
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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, self._writer_rx)
            for p in usable:
                for _ in range(self.window):
                    (background or nursery).start_soon(self._worker, p)
            await self._until_settled()
            await self.to_writer.aclose()  # late pieces from background workers are dropped
            self._wake()  # idle background workers see that nothing is pending and exit
            nursery.cancel_scope.cancel()
        if self.failure is not None:
            raise self.failure

    async def _until_settled(self) -> None:
        while self.pending and self._obtainable() and self.failure is None:
            await self.changed.wait()


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
    stats = {p.peer: {"pieces": p.pieces, "bytes": p.bytes, "dropped": p.dropped} for p in f.providers}
    if f.pending:
        raise FetchError(f"{len(f.pending)} of {len(todo)} pieces could not be fetched "
                         f"(providers: {stats})")
    return FetchResult(signed.id, f.fetched, len(needed) - len(todo), f.bytes, seconds, stats)
