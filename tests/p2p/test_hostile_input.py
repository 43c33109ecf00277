"""Hostile input to every handler and to the DHT: each documented error code (docs/protocol.md) is
answered for exactly its trigger, the server closes after answering, and the node stays up."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest
import trio
from libp2p.records.utils import InvalidRecordType

from kvnet import canonical
from kvnet.hashing import b3
from kvnet.p2p import dht as kdht
from kvnet.p2p import wire
from kvnet.p2p.server import MAX_OFFERS, MAX_PIECES_PER_REQUEST, MAX_RANGES, OFFER_PROTOCOL, PIECES_PROTOCOL
from kvnet.publish import publish_tokens
from tests.artifacts import _KEY, fake_artifact, lose_piece
from tests.conftest import random_tokens
from tests.p2p.conftest import make_node


async def _exchange(client, server, protocol: str, payload: bytes, *, close: bool = False
                    ) -> tuple[list[dict], str]:
    """Send raw bytes on a fresh stream (then half-close it if `close`) and read everything the server
    answers: the frames (piece bytes are read, not kept) and how the stream ended ('eof' or 'reset')."""
    stream = await client.host.new_stream(server.peer_id, [protocol])
    await stream.write(payload)
    if close:
        await stream.close()
    frames: list[dict] = []
    try:
        with trio.fail_after(5):
            while True:
                msg = await wire.read_frame(stream, wire.MAX_RESPONSE)
                frames.append(msg)
                if "n" in msg:
                    await wire.read_exact(stream, msg["n"])
    except wire.WireError as exc:
        return frames, exc.code
    finally:
        await stream.reset()


async def _error(client, server, protocol: str, payload: bytes, *, close: bool = False) -> str | None:
    """The code of the one error frame the server answers with, checking it then closed the stream."""
    frames, end = await _exchange(client, server, protocol, payload, close=close)
    assert end == "eof", (frames, end)  # closed after the error, not reset: the error was readable
    assert len(frames) == 1 and set(frames[0]) == {"v", "err", "msg"}, frames
    return frames[0]["err"]


def _len(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _pieces(mid: bytes, ranges, **extra) -> bytes:
    return wire.frame({"v": 1, "manifest": mid, "ranges": ranges, "receipt": None, **extra})


def _offer(key, **extra) -> bytes:
    return wire.frame({"v": 1, "key": key, "receipt": None, **extra})


@pytest.fixture
async def pair(tmp_path, tiny_bf16):
    """A serving node S holding a 300-token artifact (38 pieces) and a client C connected to it."""
    server, client = make_node(tmp_path, "S", timeout=1.0), make_node(tmp_path, "C")
    pub = publish_tokens(tiny_bf16, server.store, server.key, random_tokens(300, seed=51), piece_size=2048)
    async with trio.open_nursery() as n:
        s = await n.start(server.run)
        client.bootstrap = [s.addrs[0]]
        await n.start(client.run)
        yield s, client, pub
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_every_pieces_error_code_has_its_trigger(pair):
    s, c, pub = pair
    mid, n = pub.manifest_id, len(pub.signed.manifest.pieces)
    assert 17 < n < 65 and MAX_RANGES == 16 and MAX_PIECES_PER_REQUEST == 64
    cases = {
        # too_large: a frame over 16 KiB, more than 16 ranges, more than 64 pieces
        "request frame of 16 KiB + 1": (_len(b"\x80" + bytes(16 * 1024)), "too_large"),
        "17 ranges": (_pieces(mid, [[i, i + 1] for i in range(17)]), "too_large"),
        "65 pieces": (_pieces(mid, [[0, 65]]), "too_large"),
        "65 pieces in 2 ranges": (_pieces(mid, [[0, 40], [100, 125]]), "too_large"),
        # bad_range: shape, order, overlap, past the end
        "no ranges": (_pieces(mid, []), "bad_range"),
        "3-element range": (_pieces(mid, [[0, 1, 2]]), "bad_range"),
        "1-element range": (_pieces(mid, [[0]]), "bad_range"),
        "range not a list": (_pieces(mid, [5]), "bad_range"),
        "negative start": (_pieces(mid, [[-1, 2]]), "bad_range"),
        "empty range": (_pieces(mid, [[3, 3]]), "bad_range"),
        "inverted range": (_pieces(mid, [[4, 2]]), "bad_range"),
        "boolean bound": (_pieces(mid, [[False, True]]), "bad_range"),
        "overlapping ranges": (_pieces(mid, [[0, 3], [2, 4]]), "bad_range"),
        "repeated range": (_pieces(mid, [[1, 2], [1, 2]]), "bad_range"),
        "index past the end": (_pieces(mid, [[n - 1, n + 1]]), "bad_range"),
        # unknown_manifest
        "unknown manifest": (_pieces(bytes(32), [[0, 1]]), "unknown_manifest"),
        # the order of the checks: ranges before the manifest lookup
        "500 pieces of an unknown manifest": (_pieces(bytes(32), [[0, 500]]), "too_large"),
        "inverted range of an unknown manifest": (_pieces(bytes(32), [[2, 1]]), "bad_range"),
        # malformed: encoding, fields, version, receipt
        "invalid msgpack": (_len(b"\xc1\xc1\xc1"), "malformed"),
        "non-canonical map": (_len(msgpack.packb({"v": 1, "ranges": [[0, 1]], "manifest": mid})), "malformed"),
        "not a map": (_len(b"\x01"), "malformed"),
        "manifest of 31 bytes": (_pieces(mid[:31], [[0, 1]]), "malformed"),
        "ranges not a list": (_pieces(mid, {"0": 1}), "malformed"),
        "missing manifest": (wire.frame({"v": 1, "ranges": [[0, 1]]}), "malformed"),
        "version 2": (_pieces(mid, [[0, 1]], v=2), "malformed"),
        "no version": (wire.frame({"manifest": mid, "ranges": [[0, 1]]}), "malformed"),
        "a receipt": (_pieces(mid, [[0, 1]], receipt=b"pay"), "malformed"),
        # timeout: nothing, or an incomplete frame, within the server's timeout (1 s here)
        "silence": (b"", "timeout"),
        "half a frame": (struct.pack(">I", 10) + b"abc", "timeout"),
    }
    for name, (payload, code) in cases.items():
        assert await _error(c, s, PIECES_PROTOCOL, payload) == code, name
    # a client that closes its side mid-frame gets `malformed` (it can still read), not a timeout
    assert await _error(c, s, PIECES_PROTOCOL, struct.pack(">I", 10) + b"abc", close=True) == "malformed"
    assert await _error(c, s, OFFER_PROTOCOL, b"\x00\x00", close=True) == "malformed"
    # the largest request frame allowed (16 KiB exactly) is read, and refused only for its content:
    # its padding field, which the spec does not define (`malformed`, not `too_large`)
    pad = 16 * 1024
    while len(big := wire.frame({"v": 1, "manifest": mid, "ranges": [[0, 1]], "receipt": None,
                                 "pad": bytes(pad)})) - 4 > 16 * 1024:
        pad -= 1
    assert len(big) - 4 == 16 * 1024
    frames, end = await _exchange(c, s, PIECES_PROTOCOL, big)
    assert end == "eof" and frames == [{"v": 1, "err": "malformed", "msg": "unknown fields ['pad']"}]


@pytest.mark.trio
async def test_pieces_response_sequence_missing_pieces_and_close(pair):
    s, c, pub = pair
    mid, m = pub.manifest_id, pub.signed.manifest
    # a piece the store lost (found corrupt and dropped) is answered "missing" in its place; the others are served
    lose_piece(s.store, mid, 5)
    frames, end = await _exchange(c, s, PIECES_PROTOCOL, _pieces(mid, [[6, 8], [4, 6]]))
    assert frames == [{"i": 6, "n": m.piece_len(6)}, {"i": 7, "n": m.piece_len(7)}, {"i": 4, "n": m.piece_len(4)},
                      {"i": 5, "err": "missing"}, {"done": True}]
    assert end == "eof"  # one request per stream: the server closes after `done`
    # adjacent ranges are fine (they do not overlap)
    frames, _ = await _exchange(c, s, PIECES_PROTOCOL, _pieces(mid, [[0, 2], [2, 3]]))
    assert [f.get("i") for f in frames] == [0, 1, 2, None]


@pytest.mark.trio
async def test_every_offer_answer_and_error_code(pair):
    s, c, pub = pair
    m = pub.signed.manifest
    assert m.n_tokens == 300 and len(m.chain) == 2  # one whole block + a partial tail of 44 tokens
    for key in (pub.manifest_id, m.chain[0], m.chain[1]):  # the id, a boundary key, the partial tail key
        frames, end = await _exchange(c, s, OFFER_PROTOCOL, _offer(key))
        assert end == "eof" and len(frames) == 1
        assert [b3(o["manifest"]) for o in frames[0]["offers"]] == [pub.manifest_id]
        assert frames[0]["offers"][0]["have"] == wire.bitfield(set(range(len(m.pieces))), len(m.pieces))
        assert frames[0]["fee_per_mib"] == 0 and frames[0]["currency"] == "USD" and frames[0]["v"] == 1
    # an unknown key is an empty answer, not an error
    frames, end = await _exchange(c, s, OFFER_PROTOCOL, _offer(b"\x07" * 32))
    assert frames == [{"v": 1, "offers": [], "fee_per_mib": 0, "currency": "USD"}] and end == "eof"
    cases = {
        "request frame of 16 KiB + 1": (_len(bytes(16 * 1024 + 1)), "too_large"),
        "invalid msgpack": (_len(b"\xc1"), "malformed"),
        "non-canonical map": (_len(msgpack.packb({"v": 1, "key": b"k" * 32})), "malformed"),
        "not a map": (_len(b"\x01"), "malformed"),
        "key not bytes": (_offer("not bytes"), "malformed"),
        "short key": (_offer(b"abc"), "malformed"),
        "missing key": (wire.frame({"v": 1}), "malformed"),
        "version 2": (_offer(b"k" * 32, v=2), "malformed"),
        "a receipt": (_offer(b"k" * 32, receipt={"amount": 1}), "malformed"),
        "silence": (b"", "timeout"),
    }
    for name, (payload, code) in cases.items():
        assert await _error(c, s, OFFER_PROTOCOL, payload) == code, name
    assert [o.signed.id for o in await c.offers(s.peer_id, pub.manifest_id)] == [pub.manifest_id]


@pytest.mark.trio
async def test_offers_are_capped_at_8_most_recently_used_first(tmp_path):
    server, client = make_node(tmp_path, "S"), make_node(tmp_path, "C")
    base, _ = fake_artifact(70, 1)
    shared = b"\x42" * 32
    ids = []
    for i in range(MAX_OFFERS + 1):  # nine manifests that all contain the chain key `shared`
        m = dataclasses.replace(base.manifest, chain=(shared, *base.manifest.chain[1:]), source={"title": f"m{i}"})
        ids.append(server.store.put_manifest(m.sign(_KEY).raw).id)
    for mid in [ids[3], *ids[:3], *ids[4:]]:  # use them in this order: ids[3] least recently
        server.store.touch(mid)
    async with trio.open_nursery() as n:
        s = await n.start(server.run)
        client.bootstrap = [s.addrs[0]]
        await n.start(client.run)
        frames, _ = await _exchange(client, s, OFFER_PROTOCOL, _offer(shared))
        got = [b3(o["manifest"]) for o in frames[0]["offers"]]
        assert got == list(reversed([*ids[:3], *ids[4:]]))  # 8 offers, most recently used first
        assert all(o["have"] == b"\x00" for o in frames[0]["offers"])  # manifests only, no pieces held
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_handler_failing_unexpectedly_answers_internal_and_the_node_keeps_serving(pair):
    s, c, pub = pair
    mid, m = pub.manifest_id, pub.signed.manifest
    # the artifact's data file becomes a directory: reading it raises IsADirectoryError, which is no
    # error the server expects
    path = s.store.piece_span(mid, 3)[0]
    path.rename(path.with_suffix(".moved"))
    path.mkdir()
    frames, end = await _exchange(c, s, PIECES_PROTOCOL, _pieces(mid, [[2, 4]]))
    assert frames[0]["err"] == "internal" and "i" not in frames[0] and len(frames) == 1
    assert end == "eof"
    path.rmdir()
    path.with_suffix(".moved").rename(path)
    # the same node still serves another piece and an offer
    frames, end = await _exchange(c, s, PIECES_PROTOCOL, _pieces(mid, [[4, 5]]))
    assert frames == [{"i": 4, "n": m.piece_len(4)}, {"done": True}] and end == "eof"
    assert [o.signed.id for o in await c.offers(s.peer_id, m.chain[0])] == [mid]


@pytest.mark.trio
async def test_dht_rejects_forged_manifest_records(tmp_path, tiny_bf16):
    honest = make_node(tmp_path, "H")
    pub = publish_tokens(tiny_bf16, honest.store, honest.key, random_tokens(300, seed=52))
    raw = pub.signed.raw
    v = kdht.ManifestValidator()
    v.validate(kdht.manifest_key(pub.manifest_id), raw)  # the genuine record passes
    forged = canonical.decode(raw)
    forged["terms"] = {"price_per_load": 1, "currency": "USD"}
    forged_raw = canonical.encode(forged)
    for key, value, why in [
        (kdht.manifest_key(pub.manifest_id), forged_raw, "hash"),  # wrong content for the key
        (kdht.manifest_key(b3(forged_raw)), forged_raw, "sig"),  # right hash, signature broken
        (kdht.manifest_key(b3(b"x")), b"x", "rejected"),  # garbage
        (kdht.manifest_key(pub.manifest_id), b"y" * (5 << 20), "large"),
    ]:
        with pytest.raises(ValueError, match=why):
            v.validate(key, value)

    # a malicious node without validators pushes a forged record; honest nodes refuse to store or return it
    async with trio.open_nursery() as n:
        h = await n.start(honest.run)
        evil = make_node(tmp_path, "E", [h.addrs[0]])
        evil.dht = kdht.KadDHT(evil.host, kdht.DHTMode.SERVER)  # no kvnet validator, not strict
        evil.dht.register_validator("kvm", _AcceptAll())
        await n.start(evil.run)
        reader = make_node(tmp_path, "R", [h.addrs[0]])
        await n.start(reader.run)
        bad_key = kdht.manifest_key(b3(forged_raw))
        await evil.dht.put_value(bad_key, forged_raw)
        await trio.sleep(0.2)
        assert h.dht.value_store.get(bad_key.encode()) is None
        with trio.fail_after(10):
            assert await reader.dht.get_value(bad_key) is None
        # non-namespaced keys are refused by strict validation, before anything is stored or sent
        with pytest.raises(InvalidRecordType, match="No validator registered for key '/nonamespace'"):
            await h.dht.put_value("/nonamespace", b"v")
        assert h.dht.value_store.get(b"/nonamespace") is None
        # the genuine manifest was announced by the honest node and can be read by others
        with trio.fail_after(10):
            assert await reader.dht.get_value(kdht.manifest_key(pub.manifest_id)) == raw
        n.cancel_scope.cancel()


class _AcceptAll(kdht.Validator):
    def validate(self, key, value):
        return None

    def select(self, key, values):
        return 0
