"""Every patch of Hypercorn internals lives here, and only here (the agent socket's server).

kvnet pins Hypercorn 0.18.0 (`UPSTREAM_VERSION`). Hypercorn has knobs for the idle keep-alive timer,
the header size and the body queue, but none for how many connections one listener serves at once,
nor a deadline on a write to a client that stopped reading (its trio `TCPServer` writes under a
shielded cancel scope, so a stuck write outlives even the node's shutdown). Both are added here by
one patch, pinned by tests/daemon/test_compat_pins.py: `hypercorn.trio.run.worker_serve` builds
each connection's server as `TCPServer(app, config, context, state, stream)` from its module's
globals, and `install()` replaces that name with `_tcp_server`, which consults the `ConnectionGate`
a `GatedConfig` carries (a plain `Config` is served exactly as before).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio.run as _run
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer as _TCPServer

UPSTREAM_VERSION = "0.18.0"
REFUSE_LINGER_S = 2.0
"""How long a refused connection is kept to read (and discard) its request after the 503, so the
client reads the answer instead of a reset (closing a socket with unread bytes resets it)."""
MAX_LINGERING = 64
"""Refused connections lingering at once; beyond them a refused connection is closed at once."""

log = logging.getLogger("kvnet.daemon.compat")


class GatedConfig(Config):
    """A Hypercorn config for one listener, with the gate that bounds its connections."""

    gate: ConnectionGate | None = None


class ConnectionGate:
    """At most `limit` connections served at once on one listener; one more is answered `refusal`
    (a complete HTTP response, 503 in the OpenAI error shape) and closed. Every served connection's
    writes get `send_timeout_s` each, after which the connection is dropped."""

    def __init__(self, limit: int, send_timeout_s: float, refusal: bytes) -> None:
        self.limit, self.send_timeout_s, self.refusal = limit, send_timeout_s, refusal
        self.active = 0  # connections being served now
        self.lingering = 0  # refused connections still being drained
        self.refused = 0  # refused since start
        self.stop_at = math.inf  # set by stop(): no write outlasts it
        self._writes: set[trio.CancelScope] = set()  # the writes waiting now, each under its deadline

    def stop(self, grace_s: float) -> None:
        """The node is stopping: every write, waiting or to come, ends within `grace_s` (a client that
        does not read would otherwise keep the shielded write, and so the node, up for send_timeout_s)."""
        self.stop_at = trio.current_time() + grace_s
        for scope in self._writes:
            scope.deadline = min(scope.deadline, self.stop_at)

    async def send(self, stream: trio.SocketStream, data: bytes | bytearray | memoryview) -> bool:
        """`stream.send_all(data)` within the write deadline; False if it did not finish in time."""
        deadline = min(trio.current_time() + self.send_timeout_s, self.stop_at)
        with trio.CancelScope(deadline=deadline) as scope:  # fires inside TCPServer's shielded scope too
            self._writes.add(scope)
            try:
                await stream.send_all(data)
            finally:
                self._writes.discard(scope)
        return not scope.cancelled_caught

    async def serve(self, server: Callable[[Any], Awaitable[None]], stream: trio.SocketStream) -> None:
        if self.active >= self.limit:
            await self._refuse(stream)
            return
        self.active += 1
        gated = _GatedStream(stream, self)
        try:
            await server(gated)
        finally:
            gated.release()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        self.refused += 1
        log.warning("agent connection refused: %d open, the most this listener serves (agent.max_connections)",
                    self.active)
        if self.lingering >= MAX_LINGERING:
            await trio.aclose_forcefully(stream)
            return
        self.lingering += 1
        try:
            with trio.move_on_after(REFUSE_LINGER_S):
                await stream.send_all(self.refusal)
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass  # the client's request, unread by anyone: drained so the 503 is not reset away
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.lingering -= 1
            await trio.aclose_forcefully(stream)


class _GatedStream:
    """The `trio.SocketStream` Hypercorn's `TCPServer` uses, with a deadline on each write and the
    gate's slot released before the client can see the connection end (half-close or close), so a
    client that saw it end finds the slot free.

    It has no `do_handshake`: `TCPServer.run` tells a plain stream from a TLS one by that
    AttributeError."""

    def __init__(self, inner: trio.SocketStream, gate: ConnectionGate) -> None:
        self._inner, self._gate, self._held = inner, gate, True

    @property
    def socket(self) -> Any:
        return self._inner.socket

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.active -= 1

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not await self._gate.send(self._inner, data):
            log.warning("agent connection dropped: a write waited for the client to read past "
                        "agent.send_timeout_s (%s s) or the node's stop", self._gate.send_timeout_s)
            await self.aclose()  # the reader's receive_some ends too: the request sees a disconnect
            raise trio.BrokenResourceError("the client did not read within agent.send_timeout_s")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        self.release()  # TCPServer half-closes only as the connection ends: its slot is free from here
        await self._inner.send_eof()

    async def aclose(self) -> None:
        self.release()
        await self._inner.aclose()


def _tcp_server(app: Any, config: Config, context: Any, state: Any, stream: Any) -> Awaitable[None]:
    """What `worker_serve` builds per accepted connection: Hypercorn's own server, behind the config's
    gate when it has one."""
    gate = getattr(config, "gate", None)
    if gate is None:
        return _TCPServer(app, config, context, state, stream)

    async def server(s: Any) -> None:
        await _TCPServer(app, config, context, state, s)

    return gate.serve(server, stream)


def install() -> None:
    """Route Hypercorn's trio worker through `_tcp_server` (idempotent)."""
    _run.TCPServer = _tcp_server  # type: ignore[assignment, misc]


install()
