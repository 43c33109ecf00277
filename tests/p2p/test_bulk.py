"""The bulk path (`/kvnet/bulk/1.0.0`, docs/protocol.md) between real nodes on loopback: fetches over
TLS and plain TCP, a lying bulk provider, tokens that are bad, expired, reused or used in the wrong
mode, connections that stall or send garbage, a certificate that is not the pinned one, and the
fallback to libp2p `pieces` streams when a provider has no bulk path."""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import ssl
import threading
import time

import pytest
import trio

from kvnet import canonical
from kvnet.p2p import bulk_wire as bw
from kvnet.p2p import wire
from kvnet.p2p.bulk_client import BulkConnection, ClientGrant, Handler
from kvnet.p2p.bulk_server import BulkServer, make_tls_context
from kvnet.p2p.fetcher import BULK_GRANTS_AHEAD, ENDGAME_AFTER_S, MIN_BULK_GRANT, Fetch, Provider
from kvnet.p2p.scores import PENALTY, PeerScores
from kvnet.p2p.server import StoreRunner
from kvnet.store import Store
from tests.artifacts import fake_artifact
from tests.p2p.conftest import found_by, holding, make_node, pid, start_nodes

PIECE = 1 << 16  # 64 KiB pieces: many pieces from a few MiB


def _holding(tmp_path, name: str, sm, pieces, **kw):
    return holding(tmp_path, name, sm, pieces, timeout=2.0, **kw)


_start, _pid = start_nodes, pid


def _own_listener(node, **limits) -> BulkServer:
    """A bulk listener with test limits in place of the node's own (same store, checks and budget)."""
    srv = BulkServer(node.server, "127.0.0.1", limits=bw.BulkLimits(**limits))
    srv.start()
    node.host.set_stream_handler(bw.BULK_PROTOCOL, srv.handle_bulk)
    return srv


async def _ask_grant(client, provider, sm, ranges, mode: str) -> dict:
    """A raw `/kvnet/bulk/1.0.0` request; the answer frame."""
    stream = await client.host.new_stream(provider.peer_id, [bw.BULK_PROTOCOL])
    try:
        with trio.fail_after(5):
            await wire.write_frame(stream, {"v": 1, "manifest": sm.id, "ranges": ranges, "mode": mode,
                                            "receipt": None})
            return await wire.read_frame(stream, wire.MAX_REQUEST)
    finally:
        await stream.close()


class _Collect(Handler):
    def __init__(self) -> None:
        self.got: dict[int, bytes] = {}
        self.grants_done = 0

    def piece(self, grant, index, data) -> None:
        self.got[index] = bytes(data)

    def missing(self, grant, index) -> None:
        raise AssertionError(f"piece {index} reported missing")

    def done(self, grant) -> None:
        self.grants_done += 1


def _receive(answer: dict, mode: str, sm, indices: list[int]) -> _Collect:
    """Redeem a grant with the real receiver (blocking: run in a thread)."""
    conn = BulkConnection("127.0.0.1", answer["port"], mode, answer["fingerprint"], 5.0)
    grants: queue.Queue = queue.Queue()
    grants.put(ClientGrant(answer["token"], indices))
    grants.put(None)
    out = _Collect()
    conn.run(sm.manifest, grants, out, queue.SimpleQueue())
    return out


def _redeem_raw(port: int, token: bytes) -> bytes:
    """Send a token message on a plain connection; everything the server sends before closing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(bw.hello(token))
        out = bytearray()
        while chunk := s.recv(1 << 16):
            out += chunk
        return bytes(out)
    except ConnectionResetError:
        return b""
    finally:
        s.close()


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


@pytest.mark.trio
@pytest.mark.parametrize("mode", ["tls", "tcp"])
async def test_fetch_over_bulk(tmp_path, mode):
    sm, pieces = fake_artifact(61, 4, piece_size=PIECE)  # 64 pieces
    p = _holding(tmp_path, "P", sm, pieces)
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, p, c)
        found = await c.find_manifest(sm.id)
        result = await c.fetch(found, bulk=mode)
        n.cancel_scope.cancel()
    assert result.paths == {_pid(p): f"bulk-{mode}"}
    assert result.fetched == len(pieces) and result.providers[_pid(p)]["dropped"] is None
    assert p.bulk.served_pieces == len(pieces) and p.server.served_pieces == 0  # no libp2p piece stream
    assert result.received_bytes == sm.manifest.total_bytes  # one provider: no duplicate
    assert [bytes(c.store.read_piece(sm.id, i)) for i in range(len(pieces))] == pieces
    assert c.store.check() == []


class _LyingBulk(BulkServer):
    """A bulk listener that flips one bit in every piece it sends, and counts the grants it issues."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.grants = 0

    async def _grant(self, stream) -> None:
        self.grants += 1
        await super()._grant(stream)

    def _read_piece(self, mid: bytes, i: int) -> bytearray:
        data = super()._read_piece(mid, i)
        data[len(data) // 2] ^= 0x01
        return data

    def _send_piece(self, conn, f, i: int, offset: int, size: int, buf) -> int:  # the path that skips _read_piece
        data = bytearray(os.pread(f.fileno(), size, offset))
        data[len(data) // 2] ^= 0x01
        conn.settimeout(self.limits.stall_s)
        conn.sendall(bw.header(bw.KIND_PIECE, i, len(data)) + data)
        return len(data)


@pytest.mark.trio
async def test_a_lying_bulk_provider_is_dropped_and_scored_down(tmp_path):
    sm, pieces = fake_artifact(62, 4, piece_size=PIECE)
    honest, liar = _holding(tmp_path, "H", sm, pieces), _holding(tmp_path, "L", sm, pieces)
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, honest, liar, c)
        lying = _LyingBulk(liar.server, "127.0.0.1")
        lying.start()
        liar.host.set_stream_handler(bw.BULK_PROTOCOL, lying.handle_bulk)
        found = await found_by(c, sm.id, {_pid(liar), _pid(honest)})
        before = c.scores.good(_pid(liar), 50)  # first in line
        result = await c.fetch(found)
        n.cancel_scope.cancel()
        lying.stop()
    assert result.providers[_pid(liar)]["dropped"] == "bad_piece"
    assert result.providers[_pid(liar)]["pieces"] == 0
    # caught on its first piece: it was asked for no more grants than were already outstanding, and
    # the fetch did not fall back to its `pieces` streams either
    assert 1 <= lying.grants <= BULK_GRANTS_AHEAD and liar.server.served_pieces == 0
    assert c.scores.get(_pid(liar)) == before + PENALTY["bad_piece"]
    assert c.store.missing_pieces(sm.id) == [] and c.store.check() == []
    assert result.providers[_pid(honest)]["pieces"] == len(pieces)


@pytest.mark.trio
@pytest.mark.parametrize("mode", ["tcp", "tls"])
async def test_a_provider_whose_disk_rotted_is_caught_on_the_zero_copy_path(tmp_path, mode):
    """The provider sends its data file's bytes as they are (os.sendfile in plain mode, one read
    buffer over TLS): a flipped bit on its disk reaches the receiver, which drops it as a liar and
    stores only verified pieces from the honest one."""
    sm, pieces = fake_artifact(64, 2, piece_size=PIECE)
    honest, rotten = _holding(tmp_path, "H", sm, pieces), _holding(tmp_path, "R", sm, pieces)
    with open(rotten.store.files.path(sm.id), "r+b") as f:  # one bit of every piece
        for i in range(len(pieces)):
            f.seek(i * PIECE + 100)
            b = f.read(1)[0]
            f.seek(i * PIECE + 100)
            f.write(bytes([b ^ 0x01]))
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, honest, rotten, c)
        found = await found_by(c, sm.id, {_pid(honest), _pid(rotten)})
        c.scores.good(_pid(rotten), 50)  # first in line
        result = await c.fetch(found, bulk=mode)
        n.cancel_scope.cancel()
    assert result.providers[_pid(rotten)]["dropped"] == "bad_piece"
    assert result.providers[_pid(rotten)]["pieces"] == 0
    assert result.paths[_pid(rotten)] == f"bulk-{mode}"
    assert c.store.missing_pieces(sm.id) == [] and c.store.check() == []
    assert result.providers[_pid(honest)]["pieces"] == len(pieces)


@pytest.mark.trio
async def test_bad_expired_reused_and_wrong_mode_tokens_are_refused(tmp_path):
    sm, pieces = fake_artifact(63, 1, piece_size=PIECE)
    p = _holding(tmp_path, "P", sm, pieces)
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, p, c)
        ans = await _ask_grant(c, p, sm, [[0, 4]], "tcp")
        assert set(ans) == {"v", "host", "port", "token", "fingerprint", "ttl", "granted"}
        assert len(ans["token"]) == bw.TOKEN_BYTES and ans["ttl"] == 30 and ans["port"] == p.bulk.port
        assert await trio.to_thread.run_sync(_redeem_raw, ans["port"], secrets.token_bytes(16)) == b""
        got = await trio.to_thread.run_sync(_receive, ans, "tcp", sm, [0, 1, 2, 3])
        assert got.got == {i: pieces[i] for i in range(4)} and got.grants_done == 1
        assert await trio.to_thread.run_sync(_redeem_raw, ans["port"], ans["token"]) == b""  # single use
        tls = await _ask_grant(c, p, sm, [[4, 8]], "tls")
        assert await trio.to_thread.run_sync(_redeem_raw, tls["port"], tls["token"]) == b""  # never in clear
        with pytest.raises(bw.BulkError):  # and a token shown in the clear is burnt
            await trio.to_thread.run_sync(_receive, tls, "tls", sm, [4, 5, 6, 7])
        short = _own_listener(p, token_ttl_s=0.3)
        old = await _ask_grant(c, p, sm, [[8, 12]], "tcp")
        await trio.sleep(0.5)
        assert await trio.to_thread.run_sync(_redeem_raw, short.port, old["token"]) == b""  # expired
        n.cancel_scope.cancel()
        short.stop()
    assert p.bulk.served_pieces == 4 and short.served_pieces == 0
    assert p.bulk.closed_conns.get("token") == 4 and short.closed_conns.get("token") == 1


@pytest.mark.trio
async def test_stalled_and_garbage_connections_are_dropped_while_an_honest_fetch_proceeds(tmp_path):
    sm, pieces = fake_artifact(64, 4, piece_size=PIECE)
    p = _holding(tmp_path, "P", sm, pieces)
    c, greedy = make_node(tmp_path, "C", timeout=2.0), make_node(tmp_path, "G", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, p, c, greedy)
        srv = _own_listener(p, hello_s=0.5, stall_s=1.0, idle_s=1.0)
        silent = socket.create_connection(("127.0.0.1", srv.port))  # says nothing
        garbage = socket.create_connection(("127.0.0.1", srv.port))
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: kvnet\r\n\r\n")
        ans = await _ask_grant(greedy, p, sm, [[0, 64]], "tcp")  # a real grant, then it stops reading
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", srv.port))
        stuck.sendall(bw.hello(ans["token"]))
        found = await c.find_manifest(sm.id)
        result = await c.fetch(found, bulk="tcp")
        assert result.paths[_pid(p)] == "bulk-tcp"
        assert c.store.missing_pieces(sm.id) == []
        with trio.fail_after(10):
            while srv.closed_conns.get("timeout", 0) < 2:  # the silent one and the stuck one
                await trio.sleep(0.05)
        assert await trio.to_thread.run_sync(_closed_by_server, silent)
        assert await trio.to_thread.run_sync(_closed_by_server, garbage)
        n.cancel_scope.cancel()
        srv.stop()
    for s in (silent, garbage, stuck):
        s.close()
    assert srv.closed_conns.get("garbage") == 1 and srv.closed_conns.get("timeout") == 2
    assert c.store.check() == []


@pytest.mark.trio
async def test_a_wrong_certificate_fingerprint_aborts_before_the_token_is_sent(tmp_path):
    sm, pieces = fake_artifact(65, 1, piece_size=PIECE)
    p = _holding(tmp_path, "P", sm, pieces)
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, p, c)
        ans = await _ask_grant(c, p, sm, [[0, 4]], "tls")
        assert ans["fingerprint"] == p.bulk.fingerprint and len(ans["fingerprint"]) == bw.FINGERPRINT_BYTES
        wrong = bytes(32)
        with pytest.raises(bw.BulkError, match="fingerprint mismatch") as err:
            await trio.to_thread.run_sync(BulkConnection, "127.0.0.1", ans["port"], "tls", wrong, 5.0)
        assert err.value.reason == "unavailable"
        assert p.bulk.served_pieces == 0
        got = await trio.to_thread.run_sync(_receive, ans, "tls", sm, [0, 1, 2, 3])  # the token was never sent
        assert sorted(got.got) == [0, 1, 2, 3]
        n.cancel_scope.cancel()


def test_the_bulk_listener_picks_aes_128_gcm_even_for_a_client_in_openssls_default_order():
    """Pin test of bulk_wire.prefer_aes128_gcm (a ctypes call into the libssl Python loaded): if a
    Python or OpenSSL update moves the SSL_CTX pointer, the helper refuses and this fails."""
    server, _ = make_tls_context()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # not kvnet's: OpenSSL's default suite order
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    a, b = socket.socketpair()
    got: list = []
    t = threading.Thread(target=lambda: got.append(server.wrap_socket(a, server_side=True).cipher()))
    t.start()
    with client.wrap_socket(b) as tls:
        assert tls.cipher()[:2] == ("TLS_AES_128_GCM_SHA256", "TLSv1.3")
    t.join(10)
    a.close()
    assert got and got[0][0] == "TLS_AES_128_GCM_SHA256"
    assert bw.prefer_aes128_gcm(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


@pytest.mark.trio
@pytest.mark.parametrize("how", ["no_bulk_protocol", "listener_gone"])
async def test_fallback_to_libp2p_streams(tmp_path, caplog, how):
    caplog.set_level(logging.INFO, logger="kvnet.p2p.fetcher")
    sm, pieces = fake_artifact(66, 2, piece_size=PIECE)
    p = _holding(tmp_path, "P", sm, pieces, bulk_listen=None if how == "no_bulk_protocol" else 0)
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, p, c)
        if how == "listener_gone":  # grants are still answered, but nobody listens on their port
            p.bulk.stop()
        found = await c.find_manifest(sm.id)
        result = await c.fetch(found)
        n.cancel_scope.cancel()
    assert result.paths == {_pid(p): "streams"}
    assert result.providers[_pid(p)]["dropped"] is None and p.server.served_pieces == len(pieces)
    assert c.store.missing_pieces(sm.id) == [] and c.store.check() == []
    assert c.scores.get(_pid(p)) > 0  # falling back is no fault of the provider
    notes = [r for r in caplog.records if "bulk path unavailable" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO


@pytest.mark.trio
async def test_three_bulk_providers_are_all_used_and_bytes_stay_near_the_artifact(tmp_path):
    sm, pieces = fake_artifact(67, 16, piece_size=PIECE)  # 256 pieces
    provs = [_holding(tmp_path, name, sm, pieces) for name in ("P1", "P2", "P3")]
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, *provs, c)
        found = await found_by(c, sm.id, {_pid(x) for x in provs})
        result = await c.fetch(found, bulk="tcp")
        n.cancel_scope.cancel()
    assert set(result.paths.values()) == {"bulk-tcp"}
    assert all(result.providers[_pid(q)]["pieces"] > 0 for q in provs), result.providers
    assert sm.manifest.total_bytes <= result.received_bytes <= 1.05 * sm.manifest.total_bytes
    assert c.store.missing_pieces(sm.id) == [] and c.store.check() == []


@pytest.mark.trio
async def test_a_listener_on_every_interface_is_reached_at_the_libp2p_address(tmp_path):
    """Bound to 0.0.0.0, a grant names host "": the client connects to the IP it reached the node at."""
    sm, pieces = fake_artifact(68, 1, piece_size=PIECE)
    p = _holding(tmp_path, "P", sm, pieces, listen=["/ip4/0.0.0.0/tcp/0"])
    c = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        await _start(n, p, c)
        assert (await _ask_grant(c, p, sm, [[0, 1]], "tcp"))["host"] == ""
        found = await c.find_manifest(sm.id)
        result = await c.fetch(found)
        n.cancel_scope.cancel()
    assert result.paths == {_pid(p): "bulk-tls"} and p.bulk.served_pieces == len(pieces)
    assert c.store.missing_pieces(sm.id) == []


def _hold_grant(port: int, token: bytes, record_bytes: int) -> tuple[socket.socket, bytes]:
    """Redeem a token on a plain connection, read `record_bytes` bytes, keep the connection open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(bw.hello(token))
    got = bytearray()
    while len(got) < record_bytes and (chunk := s.recv(record_bytes - len(got))):
        got += chunk
    return s, bytes(got)


@pytest.mark.trio
async def test_bulk_connections_per_peer_are_bounded(tmp_path):
    sm, pieces = fake_artifact(69, 1, piece_size=PIECE)
    p = _holding(tmp_path, "P", sm, pieces)
    c = make_node(tmp_path, "C", timeout=2.0)
    limit = bw.BulkLimits().conns_per_peer
    async with trio.open_nursery() as n:
        await _start(n, p, c)
        grants = [await _ask_grant(c, p, sm, [[i, i + 1]], "tcp") for i in range(limit + 1)]
        held = []
        one = 2 * bw.HEADER.size + PIECE  # a piece record and the end record
        for g in grants[:limit]:
            s, got = await trio.to_thread.run_sync(_hold_grant, g["port"], g["token"], one)
            assert bw.parse_header(got[: bw.HEADER.size])[0] == bw.KIND_PIECE and len(got) == one
            held.append(s)
        s, got = await trio.to_thread.run_sync(_hold_grant, grants[-1]["port"], grants[-1]["token"], 1 << 16)
        held.append(s)
        kind, _, length = bw.parse_header(got[: bw.HEADER.size])
        assert kind == bw.KIND_ERROR and canonical.decode(got[bw.HEADER.size:], length)["err"] == "busy"
        for s in held:
            s.close()
        n.cancel_scope.cancel()
    assert p.bulk.closed_conns.get("busy") == 1 and p.bulk.served_pieces == limit


async def _no_network(peer: str, protocol: str):
    raise AssertionError("assignment alone opens no stream")


def _assigning(tmp_path, sm, providers: list[Provider], needed: list[int] | None = None, **kw) -> Fetch:
    """A fetch of `needed` (default: every piece of `sm`) from `providers`, used for its assignment
    only (nothing is sent)."""
    needed = list(range(len(sm.manifest.pieces))) if needed is None else needed
    return Fetch(sm, needed, providers, StoreRunner(Store(tmp_path / "store")), _no_network, PeerScores(None),
                 bulk="tcp", **kw)


def _delivered(p: Provider, nbytes: int, seconds: float) -> None:
    """`p` delivered `nbytes` after its first piece, over `seconds` (as its receiver records it)."""
    p.first_piece_at, p.first_piece_bytes, p.received = 100.0, 0, nbytes
    p.last_piece_at = 100.0 + seconds


@pytest.mark.trio
async def test_bulk_grants_split_the_work_left_by_measured_rate_and_a_lone_provider_takes_full_grants(tmp_path):
    sm, _ = fake_artifact(71, 16, piece_size=PIECE)  # 256 pieces
    n = len(sm.manifest.pieces)
    alone = Provider("alone", set(range(n)))
    f = _assigning(tmp_path / "1", sm, [alone])
    assert [len(f._take(alone, bulk=True)) for _ in range(5)] == [64, 64, 64, 64, 0]
    fast, slow = Provider("fast", set(range(n))), Provider("slow", set(range(n)))
    f = _assigning(tmp_path / "2", sm, [fast, slow], bulk_batch=n)
    _delivered(fast, 3 << 20, 1.0)
    _delivered(slow, 1 << 20, 1.0)
    assert len(f._take(fast, bulk=True)) == 192  # 3/4 of the work, the rate's share
    assert len(f._take(slow, bulk=True)) == 64  # the rest: its quarter of all the work
    even1, even2 = Provider("even1", set(range(n))), Provider("even2", set(range(n)))
    f = _assigning(tmp_path / "3", sm, [even1, even2], bulk_batch=n)  # no rate known yet: equal parts
    assert len(f._take(even1, bulk=True)) == 128 and len(f._take(even2, bulk=True)) == 128


@pytest.mark.trio
async def test_a_small_fetch_is_split_evenly_not_in_grants_of_the_minimum(tmp_path):
    """40 pieces from 3 providers: MIN_BULK_GRANT (16) would give 16/16/8, and the third would idle
    while the others still send; the floor is an even split of the fetch, so 14/14/12."""
    sm, _ = fake_artifact(73, 3, piece_size=PIECE)  # 48 pieces, 40 of them fetched
    ps = [Provider(f"p{k}", set(range(len(sm.manifest.pieces)))) for k in range(3)]
    f = _assigning(tmp_path, sm, ps, needed=list(range(40)))
    assert [len(f._take(p, bulk=True)) for p in ps] == [14, 14, 12]
    assert MIN_BULK_GRANT == 16


@pytest.mark.trio
async def test_an_endgame_duplicate_is_asked_only_for_a_piece_whose_provider_stalled(tmp_path):
    sm, _ = fake_artifact(72, 1, piece_size=PIECE)  # 16 pieces
    n = len(sm.manifest.pieces)
    holder, idle = Provider("holder", set(range(n))), Provider("idle", set(range(n)))
    f = _assigning(tmp_path, sm, [holder, idle])
    f.pending = {0, 1}
    assert f._take(holder, bulk=True) == [0, 1]
    for i in (0, 1):  # asked long ago: due by the age of the request alone
        f.asked_at[i] -= 5 * ENDGAME_AFTER_S
    holder.last_piece_at = time.monotonic()  # ... but its provider delivered a piece just now
    assert f._take(idle, bulk=True) == []
    assert idle.endgame_at > trio.current_time() + ENDGAME_AFTER_S / 2  # its waiter wakes when that is due
    holder.last_piece_at = time.monotonic() - 2 * ENDGAME_AFTER_S  # nothing from it since: stalled
    assert f._take(idle, bulk=True) == [0]  # one duplicate per request
    assert f.in_flight[0] == {"holder", "idle"}
