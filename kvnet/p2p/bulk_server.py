"""Serving side of `/kvnet/bulk/1.0.0` (docs/protocol.md): grants over libp2p, bytes over a side socket.

A grant request arrives on a libp2p stream and goes through the same checks, limits and byte budget
as a `pieces` request (kvnet.p2p.server.PieceServer: one implementation of the rules). The answer
names this node's bulk listener and carries a single-use token bound to (asking peer, manifest,
pieces, mode, expiry) and the SHA-256 of the listener's ephemeral TLS certificate.

The listener is a plain TCP socket served by threads (blocking I/O, off the trio loop). Each
connection redeems tokens one after another, so one connection carries many grants with no gap
between them. One store call through the node's StoreRunner (the store is used from one thread at a
time) places a grant's pieces in the artifact's data file; their bytes then go from that file to the
socket (os.sendfile in plain mode), unless the store verifies on read, when each piece is read and
re-hashed through the store first. A connection that sends no valid token in time, sends garbage or
stops reading is closed; nothing it does reaches other connections.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import queue
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvnet.manifest import SignedManifest
from kvnet.p2p import bulk_wire as bw
from kvnet.p2p import wire
from kvnet.p2p.server import PieceServer, stream_peer
from kvnet.pieces import ArtifactError
from kvnet.store import NotFoundError, Store

log = logging.getLogger("kvnet.p2p.bulk")
CERT_DAYS = 30  # the certificate is ephemeral (a new one per start); its dates only have to be sane
ACCEPT_POLL_S = 0.25  # how often the accept thread (and a blocked read-ahead) looks at the stop flag
SOCKET_BUFFER = 4 << 20  # bytes of kernel send buffer asked for (a bandwidth-delay product's worth)
READ_AHEAD = 2  # pieces read from the store ahead of the one being sent, per connection


def make_tls_context() -> tuple[ssl.SSLContext, bytes]:
    """A TLS 1.3-only server context with a fresh self-signed ECDSA P-256 certificate, and the
    SHA-256 fingerprint of its DER bytes (what grants carry and clients pin)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvnet-bulk")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS)).sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="kvnet-bulk-") as tmp:  # ssl loads keys from files only
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        ctx.load_cert_chain(cert_path, key_path)
    bw.prefer_aes128_gcm(ctx)  # the server's order decides the suite (OP_CIPHER_SERVER_PREFERENCE)
    return ctx, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


@dataclass
class Grant:
    """What one token allows: these pieces of this manifest, to this peer, in this mode, until then."""

    token: bytes
    peer: str
    signed: SignedManifest
    indices: list[int]
    mode: str
    expires: float  # time.monotonic()
    spans: list[tuple[Path, int, int] | None] | None = None  # looked up when issued (None: at send time)


class _Closed(Exception):
    """The connection is over (EOF, bad or missing token, a limit): close it quietly."""


class BulkServer:
    def __init__(self, pieces: PieceServer, ip: str, port: int = 0, limits: bw.BulkLimits | None = None) -> None:
        """`pieces` holds the store runner, the request checks and the per-peer budget shared with
        `/kvnet/pieces/1.0.0`; `ip` is the address to bind (the node's first listen address)."""
        self.pieces = pieces
        self.ip, self.port = ip, port
        self.limits = limits or bw.BulkLimits()
        self.tls, self.fingerprint = make_tls_context()
        self.served_pieces = 0
        self.served_bytes = 0
        self.closed_conns: dict[str, int] = {}  # why connections were closed early -> count (tests, logs)
        self._lock = threading.Lock()
        self._grants: dict[bytes, Grant] = {}
        self._grants_by_peer: dict[str, int] = {}
        self._conns: set[socket.socket] = set()
        self._peer_conns: dict[str, int] = {}
        self._threads: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._trio_token: Any = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and start the accept thread; call from the trio thread (pieces are read through it)."""
        self._trio_token = trio.lowlevel.current_trio_token()
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((self.ip, self.port))
        sock.listen(self.limits.conns_total)
        sock.settimeout(ACCEPT_POLL_S)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._acceptor = self._spawn(self._accept_loop)
        log.info("bulk listener on %s:%d", self.ip, self.port)

    def stop(self) -> None:
        """Stop accepting and cut every connection. Only the accept thread is waited for: a
        connection thread may be waiting on the trio loop (a store read), which is the caller's,
        so it is left to end on its own once its socket is cut."""
        self._stop.set()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _shutdown(c)
        if self._acceptor is not None:
            self._acceptor.join(2 * ACCEPT_POLL_S + 1.0)
        if self._sock is not None:
            self._sock.close()

    def _spawn(self, fn: Any, *args: Any) -> threading.Thread:
        t = threading.Thread(target=self._run_thread, args=(fn, *args), daemon=True, name="kvnet-bulk")
        with self._lock:
            self._threads.add(t)
        t.start()
        return t

    def _run_thread(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @property
    def advertised_host(self) -> str:
        """The host a grant names: the bound IP, or "" (the address the peer reached us at over
        libp2p) when bound to every interface."""
        return "" if self.ip in ("0.0.0.0", "::") else self.ip

    # -- grants (trio side) ---------------------------------------------------------------------

    async def handle_bulk(self, stream: Any) -> None:
        await self.pieces.guard(stream, "bulk", self._grant)

    async def _grant(self, stream: Any) -> None:
        req = await self.pieces.read_request(stream, bw.BULK_FIELDS, paid=True)
        mode = req.get("mode", bw.DEFAULT_MODE)
        if mode not in bw.MODES:
            raise wire.WireError("malformed", f"mode must be one of {sorted(bw.MODES)}")
        sm, indices = await self.pieces.resolve(req)
        store = self.pieces.runner.store
        # the pieces' places in the data file, looked up now (the grant's libp2p round trip hides it)
        # so that the connection thread goes from one grant's end to the next grant's bytes without
        # waiting on this loop; a file removed meanwhile is answered `missing` when the grant is sent
        spans = None if store.verify_on_read else await self.pieces.runner.call(_piece_spans, store, sm.id, indices)
        peer = stream_peer(stream)
        sizes = [sm.manifest.piece_len(i) for i in indices]
        # receipts taken, then a prefix within the credit window (kvnet.p2p.billing) and the byte budget
        k = await self.pieces.bill(peer, sm, sizes, req)
        n_bytes = sum(sizes[:k])
        try:
            self._reserve(peer)
        except BaseException:
            self.pieces.unbill(peer, n_bytes, n_bytes)
            raise
        try:
            fits = self.pieces.charge_prefix(peer, sizes[:k])
        except BaseException:
            with self._lock:
                self._unreserve(peer)
            self.pieces.unbill(peer, n_bytes, n_bytes)
            raise
        if fits < k:  # over the byte budget: the part that fits, the rest not granted
            over = sum(sizes[fits:k])
            self.pieces.unbill(peer, over, over)
            k = fits
        indices = indices[:k]
        spans = None if spans is None else spans[:k]  # a prefix granted: its pieces' places only
        token = secrets.token_bytes(bw.TOKEN_BYTES)
        with self._lock:
            self._grants[token] = Grant(token, peer, sm, indices, mode, time.monotonic() + self.limits.token_ttl_s,
                                        spans)
        await wire.write_frame(stream, {"v": wire.PROTOCOL_VERSION, "host": self.advertised_host, "port": self.port,
                                        "token": token, "fingerprint": self.fingerprint,
                                        "ttl": int(self.limits.token_ttl_s), "granted": k})

    def _reserve(self, peer: str) -> None:
        """Count a new outstanding grant for `peer`, or refuse with `busy` (bounds what tokens hold)."""
        with self._lock:
            self._expire()
            if self._grants_by_peer.get(peer, 0) >= self.limits.grants_per_peer:
                why = f"at most {self.limits.grants_per_peer} outstanding bulk grants per peer"
            elif len(self._grants) >= self.limits.grants_total:
                why = f"at most {self.limits.grants_total} outstanding bulk grants"
            else:
                self._grants_by_peer[peer] = self._grants_by_peer.get(peer, 0) + 1
                return
        raise self.pieces.refuse(peer, "busy", why)

    def _unreserve(self, peer: str) -> None:
        """One outstanding grant of `peer` fewer (the caller holds the lock)."""
        left = self._grants_by_peer.get(peer, 0) - 1
        if left > 0:
            self._grants_by_peer[peer] = left
        else:
            self._grants_by_peer.pop(peer, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for token, g in list(self._grants.items()):
            if g.expires <= now:
                del self._grants[token]
                self._unreserve(g.peer)
                self.pieces.unbill(g.peer, _grant_bytes(g), _grant_bytes(g))  # never redeemed: nothing owed

    def _redeem(self, token: bytes, mode: str) -> Grant | None:
        """The grant for `token`, removed (single use), if it exists, has not expired, and was issued
        for this connection's mode (a `tls` grant is never served in the clear)."""
        with self._lock:
            self._expire()
            g = self._grants.pop(token, None)
            if g is not None:
                self._unreserve(g.peer)
        if g is None or g.mode != mode:
            return None
        return g

    # -- the listener (threads) -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= self.limits.conns_total
                if not full:
                    self._conns.add(conn)
            if full:
                self._count("full")
                conn.close()
                continue
            self._spawn(self._serve_conn, conn)

    def _count(self, why: str) -> None:
        with self._lock:
            self.closed_conns[why] = self.closed_conns.get(why, 0) + 1

    def _serve_conn(self, raw: socket.socket) -> None:
        conn: socket.socket = raw
        peer: str | None = None
        try:
            raw.settimeout(self.limits.hello_s)  # the whole hello (TLS handshake + token) within this
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            deadline = time.monotonic() + self.limits.hello_s
            first = raw.recv(1, socket.MSG_PEEK)
            if not first:
                raise _Closed("eof")
            mode = bw.MODE_TLS if first[0] == bw.TLS_RECORD_HANDSHAKE else bw.MODE_TCP
            if mode == bw.MODE_TLS:
                conn = self.tls.wrap_socket(raw, server_side=True)
                with self._lock:
                    self._conns.discard(raw)
                    self._conns.add(conn)
            grant = self._read_hello(conn, mode, max(0.01, deadline - time.monotonic()))
            peer = grant.peer
            with self._lock:
                over = self._peer_conns.get(peer, 0) >= self.limits.conns_per_peer
                if not over:
                    self._peer_conns[peer] = self._peer_conns.get(peer, 0) + 1
            if over:
                peer = None
                self._send_error(conn, "busy", f"at most {self.limits.conns_per_peer} bulk connections per peer")
                raise _Closed("busy")
            while True:
                try:
                    self._send_grant(conn, grant)
                except BaseException:  # cut mid-grant: what it sent is the payer's to pay, the rest forgiven
                    self.pieces.unbill(grant.peer, _grant_bytes(grant), _grant_bytes(grant))
                    raise
                self.pieces.unbill(grant.peer, _grant_bytes(grant), 0)
                nxt = self._read_hello(conn, mode, self.limits.idle_s)
                if nxt.peer != grant.peer:
                    raise _Closed("token")
                grant = nxt
        except _Closed as exc:
            if str(exc) != "eof":
                self._count(str(exc))
        except TimeoutError:
            self._count("timeout")
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._count("error")
            log.debug("bulk connection failed: %r", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._conns.discard(raw)
                if peer is not None:
                    left = self._peer_conns.get(peer, 1) - 1
                    if left > 0:
                        self._peer_conns[peer] = left
                    else:
                        self._peer_conns.pop(peer, None)
            with contextlib.suppress(OSError):
                conn.close()

    def _read_hello(self, conn: socket.socket, mode: str, timeout: float) -> Grant:
        """A token message within `timeout`, redeemed; anything else closes the connection."""
        conn.settimeout(timeout)
        buf = bytearray(bw.HELLO_BYTES)
        view, got = memoryview(buf), 0
        deadline = time.monotonic() + timeout
        while got < len(buf):
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            n = conn.recv_into(view[got:])
            if n == 0:
                raise _Closed("eof" if got == 0 else "garbage")
            got += n
        if bytes(buf[: len(bw.MAGIC)]) != bw.MAGIC:
            raise _Closed("garbage")
        grant = self._redeem(bytes(buf[len(bw.MAGIC):]), mode)
        if grant is None:
            raise _Closed("token")
        return grant

    def _send_grant(self, conn: socket.socket, grant: Grant) -> None:
        """Every granted piece in order (or `missing`), then the end record."""
        conn.settimeout(self.limits.stall_s)
        if self.pieces.runner.store.verify_on_read:  # every piece re-hashed on its way out
            self._send_grant_read(conn, grant)
        else:
            self._send_grant_spans(conn, grant)
        conn.sendall(bw.header(bw.KIND_END, len(grant.indices), 0))

    def _send_grant_spans(self, conn: socket.socket, grant: Grant) -> None:
        """The piece bytes go straight from the artifact's data file to the socket, after one store
        call for the whole grant's (file, offset, size): in plain mode with os.sendfile (no copy
        through Python), over TLS read into one reused buffer. Measured (docs/benchmarks.md): a store
        worker round trip and a fresh buffer per piece were most of the provider's time. A piece the
        store cannot place (not present, or a store layout without data files) goes through the read
        path, which answers it as before (the piece, or `missing`)."""
        spans = grant.spans
        if spans is None:
            spans = trio.from_thread.run(self.pieces.runner.call, _piece_spans, self.pieces.runner.store,
                                         grant.signed.id, grant.indices, trio_token=self._trio_token)
        files: dict[Path, Any] = {}
        plain = grant.mode == bw.MODE_TCP
        # TLS: header and piece in one buffer, so one sendall (and one TLS record fewer) per piece
        buf = None if plain else bytearray(bw.HEADER.size + grant.signed.manifest.piece_size)
        if plain:  # blocking sends with a kernel send timeout: no poll before every sendfile chunk
            _blocking_sends(conn, self.limits.stall_s)
        try:
            for i, span in zip(grant.indices, spans, strict=True):
                if span is None:
                    if plain:
                        conn.settimeout(self.limits.stall_s)
                    self._send_grant_read(conn, Grant(grant.token, grant.peer, grant.signed, [i], grant.mode,
                                                      grant.expires))
                    if plain:
                        _blocking_sends(conn, self.limits.stall_s)
                    continue
                path, offset, size = span
                try:
                    f = files.get(path) or files.setdefault(path, open(path, "rb"))  # noqa: SIM115
                except FileNotFoundError:  # removed since: the piece is gone
                    conn.sendall(bw.header(bw.KIND_MISSING, i, 0))
                    continue
                sent = self._send_piece(conn, f, i, offset, size, buf)
                if sent != size:  # the file was cut after the header
                    raise _Closed("internal")
                self.served_pieces += 1
                self.served_bytes += size
        finally:
            conn.settimeout(self.limits.stall_s)
            for f in files.values():
                f.close()

    def _send_grant_read(self, conn: socket.socket, grant: Grant) -> None:
        """Each piece read from the store (verified there if the store verifies on read), then sent."""
        for i, data, exc in self._read_ahead(grant):
            if isinstance(exc, NotFoundError | ArtifactError):  # evicted, or found corrupt and dropped
                conn.sendall(bw.header(bw.KIND_MISSING, i, 0))
                continue
            if exc is not None:  # the node is stopping, or the store failed
                self._send_error(conn, "internal", type(exc).__name__)
                raise _Closed("internal") from exc
            assert data is not None
            conn.sendall(bw.header(bw.KIND_PIECE, i, len(data)))
            conn.sendall(data)
            self.served_pieces += 1
            self.served_bytes += len(data)

    def _read_ahead(self, grant: Grant) -> Iterator[tuple[int, bytearray | None, BaseException | None]]:
        """The grant's pieces in order, each read by a helper thread while the one before is sent
        (a store read goes through the trio loop; without this the socket idled during every read)."""
        ahead: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        stop = threading.Event()

        def reader() -> None:
            for i in grant.indices:
                try:
                    item = (i, self._read_piece(grant.signed.id, i), None)
                except BaseException as exc:  # noqa: BLE001 - handed to the sender, which answers it
                    item = (i, None, exc)
                while not stop.is_set():
                    try:
                        ahead.put(item, timeout=ACCEPT_POLL_S)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or item[2] is not None and not isinstance(item[2], NotFoundError | ArtifactError):
                    return

        threading.Thread(target=reader, daemon=True, name="kvnet-bulk-read").start()
        try:
            for _ in grant.indices:
                item = ahead.get()
                yield item
                if item[2] is not None and not isinstance(item[2], NotFoundError | ArtifactError):
                    return
        finally:
            stop.set()

    def _read_piece(self, mid: bytes, i: int) -> bytearray:
        """A piece from the store, read through the node's StoreRunner (from a listener thread)."""
        return trio.from_thread.run(self.pieces.runner.call, self.pieces.runner.store.read_piece, mid, i,
                                    trio_token=self._trio_token)

    def _send_piece(self, conn: socket.socket, f: Any, i: int, offset: int, size: int, buf: bytearray | None) -> int:
        """One piece record from file `f`: with os.sendfile when `buf` is None (a plain socket), else
        through `buf` (TLS must encrypt in user space). Returns the piece bytes sent."""
        if buf is None:
            return self._sendfile_piece(conn, f, i, offset, size)
        return self._send_tls_piece(conn, f, i, offset, size, buf)

    def _sendfile_piece(self, conn: socket.socket, f: Any, i: int, offset: int, size: int) -> int:
        """Header, then `size` bytes of `f` from `offset` with os.sendfile on a blocking socket (the
        header waits for the piece's first bytes: MSG_MORE). Returns the bytes sent, fewer only if
        the file ends first; TimeoutError if the record is not accepted within stall_s."""
        deadline = time.monotonic() + self.limits.stall_s
        try:
            conn.sendall(bw.header(bw.KIND_PIECE, i, size), socket.MSG_MORE)
            sent = 0
            while sent < size:
                n = os.sendfile(conn.fileno(), f.fileno(), offset + sent, size - sent)
                if n == 0:
                    break
                sent += n
                if sent < size and time.monotonic() > deadline:
                    raise TimeoutError(f"piece {i} not accepted within {self.limits.stall_s} s")
        except BlockingIOError as exc:  # SO_SNDTIMEO expired with nothing accepted
            raise TimeoutError(f"piece {i} not accepted within {self.limits.stall_s} s") from exc
        return sent

    @staticmethod
    def _send_tls_piece(conn: socket.socket, f: Any, i: int, offset: int, size: int, buf: bytearray) -> int:
        """Header and piece read into `buf` after it, sent with one sendall (TLS encrypts in user
        space). Returns the piece bytes sent, fewer only if the file ends first (then nothing is sent)."""
        h = bw.HEADER.size
        view, got = memoryview(buf)[: h + size], 0
        while got < size:
            n = os.preadv(f.fileno(), [view[h + got:]], offset + got)
            if n == 0:
                return got
            got += n
        bw.HEADER.pack_into(buf, 0, bw.KIND_PIECE, bw.RESERVED, i, size)
        conn.sendall(view)
        return got

    @staticmethod
    def _send_error(conn: socket.socket, code: str, msg: str) -> None:
        payload = wire.frame(wire.error(code, msg))[4:]
        with contextlib.suppress(OSError):
            conn.settimeout(2.0)
            conn.sendall(bw.header(bw.KIND_ERROR, 0, len(payload)) + payload)


def _piece_spans(store: Store, mid: bytes, indices: list[int]) -> list[tuple[Path, int, int] | None]:
    """(data file, offset, size) of each piece, None where the store cannot place it (one store call
    per grant instead of one per piece)."""
    out: list[tuple[Path, int, int] | None] = []
    for i in indices:
        try:
            out.append(store.piece_span(mid, i))
        except NotFoundError:
            out.append(None)
    return out


def _blocking_sends(conn: socket.socket, timeout: float) -> None:
    """Make `conn` blocking, with the kernel's send timeout (SO_SNDTIMEO) as the stall limit: a send
    or sendfile then waits in the kernel instead of Python polling the socket before every chunk
    (what `socket.sendfile` does on a socket with a timeout)."""
    conn.settimeout(None)
    sec = int(timeout)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((timeout - sec) * 1e6)))


def _grant_bytes(g: Grant) -> int:
    return sum(g.signed.manifest.piece_len(i) for i in g.indices)


def _shutdown(sock: socket.socket) -> None:
    """Wake a thread blocked on `sock` (for a TLS socket: the TCP socket under it, not a TLS close)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
