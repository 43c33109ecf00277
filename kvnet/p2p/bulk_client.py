"""Receiving side of the bulk path: one connection, many grants, every piece verified as it arrives.

All socket I/O of a connection happens in one thread (an SSL object must not be read and written from
two threads at once), which both sends the tokens and reads the records. Grants are queued by the
fetcher (trio side); the receiver sends each queued token as soon as it sees it, between records, so
the next grant's token reaches the provider before the current grant ends and the connection never
idles between grants. Each piece is read into a reused page-aligned buffer, checked (its index is the next one
granted, its length the manifest's, then BLAKE3 against the signed manifest) and only then handed on.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import queue
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field

from kvnet import canonical
from kvnet.manifest import Manifest
from kvnet.p2p import bulk_wire as bw
from kvnet.p2p import wire
from kvnet.pieces import ArtifactError, verify_piece

QUEUE_POLL_S = 0.5  # how often an idle receiver looks whether it was aborted
SOCKET_BUFFER = 4 << 20  # bytes of kernel receive buffer asked for (a bandwidth-delay product's worth)


@dataclass
class ClientGrant:
    """A grant as the receiver tracks it: the token to send, the pieces due in order."""

    token: bytes
    indices: list[int]
    received: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    next: int = 0  # position in `indices` of the next record due


class Handler:
    """What the receiver thread reports to (the fetcher implements it; calls come from that thread)."""

    def piece(self, grant: ClientGrant, index: int, data: memoryview) -> None:
        raise NotImplementedError

    def missing(self, grant: ClientGrant, index: int) -> None:
        raise NotImplementedError

    def done(self, grant: ClientGrant) -> None:
        raise NotImplementedError


def _tls_client_context() -> ssl.SSLContext:
    """TLS 1.3 only, no CA verification: the certificate is pinned by its fingerprint instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    bw.prefer_aes128_gcm(ctx)
    return ctx


class BulkConnection:
    def __init__(self, host: str, port: int, mode: str, fingerprint: bytes, timeout: float) -> None:
        """Connect (and for `tls`, handshake and pin `fingerprint`); raise BulkError('unavailable') on
        any failure, before a byte of piece data is read."""
        self.timeout = timeout
        self.aborted = False
        self.received_bytes = 0  # piece bytes read (what a fetch counts as received)
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise bw.BulkError("unavailable", f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self.sock: socket.socket = raw
            if mode == bw.MODE_TLS:
                self.sock = _tls_client_context().wrap_socket(raw)
                der = self.sock.getpeercert(binary_form=True) or b""
                if hashlib.sha256(der).digest() != fingerprint:
                    raise bw.BulkError("unavailable", "the bulk server's certificate is not the one the grant "
                                       "pinned (fingerprint mismatch)")
        except bw.BulkError:
            self.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise bw.BulkError("unavailable", f"TLS with {host}:{port} failed: {exc}") from exc
        self.sock.settimeout(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Cut the connection from another thread (the fetch is over): the receiver stops at once."""
        self.aborted = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    # -- the receiver thread --------------------------------------------------------------------

    def run(self, m: Manifest, grants: queue.Queue, handler: Handler, buffers: queue.SimpleQueue) -> None:
        """Send the tokens of queued grants and receive their records until a `None` is queued and
        every grant is done. Raises BulkError with the reason a fetcher drops the provider for."""
        outstanding: deque[ClientGrant] = deque()
        closing = False
        try:
            while True:
                closing = self._send_queued(grants, outstanding, closing)
                if not outstanding:
                    return
                self._record(m, outstanding, handler, buffers)
        except bw.BulkError:
            if self.aborted:  # cut on purpose: the fetch is over
                return
            raise
        except TimeoutError as exc:
            raise bw.BulkError("timeout", f"no data within {self.timeout} s") from exc
        except (OSError, ssl.SSLError) as exc:
            if self.aborted:
                return
            raise bw.BulkError("protocol", f"bulk connection failed: {exc}") from exc
        finally:
            self.close()

    def _send_queued(self, grants: queue.Queue, outstanding: deque, closing: bool) -> bool:
        """Send every token queued so far; wait for one only when nothing is outstanding."""
        while not closing:
            try:  # the fetcher always queues a grant or None soon, or aborts the connection
                g = grants.get(block=not outstanding, timeout=QUEUE_POLL_S)
            except queue.Empty:
                if outstanding:
                    return closing
                if self.aborted:
                    return True
                continue
            if g is None:
                return True
            self.sock.sendall(bw.hello(g.token))
            outstanding.append(g)
        return closing

    def _recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise bw.BulkError("bad_length" if got else "protocol",
                                   f"connection ended after {got} of {len(view)} bytes")
            got += n

    def _record(self, m: Manifest, outstanding: deque, handler: Handler, buffers: queue.SimpleQueue) -> None:
        """Read and check one record of the oldest outstanding grant."""
        g = outstanding[0]
        head = bytearray(bw.HEADER.size)
        self._recv_exact(memoryview(head))
        kind, index, length = bw.parse_header(head)
        if kind == bw.KIND_ERROR:
            raise self._error_record(length)
        if kind == bw.KIND_END:
            if g.next != len(g.indices):
                raise bw.BulkError("protocol", f"grant ended without pieces {g.indices[g.next:][:5]}")
            outstanding.popleft()
            handler.done(g)
            return
        if g.next >= len(g.indices) or index != g.indices[g.next]:
            raise bw.BulkError("protocol", f"unrequested or out-of-order piece {index}")
        g.next += 1
        if kind == bw.KIND_MISSING:
            g.missing.append(index)
            handler.missing(g, index)
            return
        want = m.piece_len(index)
        if length != want:
            raise bw.BulkError("bad_length", f"piece {index}: {length} bytes announced, manifest says {want}")
        try:
            buf = buffers.get_nowait()
        except queue.Empty:
            buf = mmap.mmap(-1, m.piece_size)  # page aligned: the store writes it with O_DIRECT, no copy
        view = memoryview(buf)[:length]
        self._recv_exact(view)
        self.received_bytes += length
        try:
            verify_piece(m, index, view)
        except ArtifactError as exc:
            raise bw.BulkError("bad_piece", str(exc)) from exc
        g.received.append(index)
        handler.piece(g, index, view)

    def _error_record(self, length: int) -> bw.BulkError:
        if length > bw.MAX_ERROR_RECORD:
            return bw.BulkError("protocol", f"error record of {length} bytes")
        raw = bytearray(length)
        self._recv_exact(memoryview(raw))
        try:
            msg = canonical.decode(bytes(raw), bw.MAX_ERROR_RECORD)
            code, text = msg.get("err"), msg.get("msg", "")
        except (canonical.CanonicalError, AttributeError):
            return bw.BulkError("protocol", "malformed error record")
        reason = "refused" if code in wire.LOAD_CODES else "protocol"
        return bw.BulkError(reason, f"peer refused: {code} {text}")
