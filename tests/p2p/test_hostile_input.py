"""Hostile input to every handler and to the DHT: rejected with a clear error, the node stays up."""

import struct

import msgpack
import pytest
import trio

from kvnet import canonical
from kvnet.hashing import b3
from kvnet.p2p import dht as kdht
from kvnet.p2p import wire
from kvnet.p2p.server import OFFER_PROTOCOL, PIECES_PROTOCOL
from kvnet.publish import publish_tokens
from tests.conftest import random_tokens
from tests.p2p.conftest import make_node


async def _raw(client, server, protocol: str, payload: bytes) -> dict | None:
    """Send raw bytes on a fresh stream; return the error frame the server answers with (or None)."""
    stream = await client.host.new_stream(server.peer_id, [protocol])
    await stream.write(payload)
    try:
        with trio.fail_after(5):
            return await wire.read_frame(stream, wire.MAX_RESPONSE)
    except wire.WireError:
        return None
    finally:
        await stream.reset()


def _len(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _frame(obj) -> bytes:
    return wire.frame(obj)


@pytest.mark.trio
async def test_every_handler_rejects_garbage_and_keeps_serving(tmp_path, tiny_bf16):
    server, client = make_node(tmp_path, "S", timeout=1.0), make_node(tmp_path, "C")
    pub = publish_tokens(tiny_bf16, server.store, server.key, random_tokens(300, seed=51), piece_size=8192)
    mid = pub.manifest_id
    async with trio.open_nursery() as n:
        s = await n.start(server.run)
        client.bootstrap = [s.addrs[0]]
        await n.start(client.run)
        cases = {
            "oversized frame": (PIECES_PROTOCOL, struct.pack(">I", 100 << 20) + b"x" * 64, "too_large"),
            "malformed msgpack": (PIECES_PROTOCOL, struct.pack(">I", 3) + b"\xc1\xc1\xc1", "malformed"),
            "non-canonical map": (OFFER_PROTOCOL, _len(msgpack.packb({"v": 1, "key": b"k" * 32})), "malformed"),
            "unknown manifest": (PIECES_PROTOCOL, _frame({"v": 1, "manifest": bytes(32), "ranges": [[0, 1]]}),
                                 "unknown_manifest"),
            "out-of-range index": (PIECES_PROTOCOL, _frame({"v": 1, "manifest": mid, "ranges": [[9, 11]]}),
                                   "bad_range"),
            "negative range": (PIECES_PROTOCOL, _frame({"v": 1, "manifest": mid, "ranges": [[-1, 2]]}), "bad_range"),
            "too many pieces": (PIECES_PROTOCOL, _frame({"v": 1, "manifest": mid, "ranges": [[0, 500]]}),
                                "too_large"),
            "wrong key type": (OFFER_PROTOCOL, _frame({"v": 1, "key": "not bytes"}), "malformed"),
            "short key": (OFFER_PROTOCOL, _frame({"v": 1, "key": b"abc"}), "malformed"),
            "not a map": (OFFER_PROTOCOL, struct.pack(">I", 1) + b"\x01", "malformed"),
        }
        for name, (proto, payload, code) in cases.items():
            resp = await _raw(client, s, proto, payload)
            assert resp is not None and resp.get("err") == code, (name, resp)
        # a client that opens a stream and says nothing is timed out, not waited for forever
        assert (await _raw(client, s, PIECES_PROTOCOL, b""))["err"] == "timeout"
        assert (await _raw(client, s, OFFER_PROTOCOL, struct.pack(">I", 10) + b"abc"))["err"] == "timeout"
        # and the node is still up and serving a proper request afterwards
        offers = await client.offers(s.peer_id, mid)
        assert [o.signed.id for o in offers] == [mid]
        n.cancel_scope.cancel()


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
        # non-namespaced keys are refused by strict validation
        with pytest.raises(Exception):  # noqa: B017 - py-libp2p raises a plain exception type here
            await h.dht.put_value("/nonamespace", b"v")
        # the genuine manifest was announced by the honest node and can be read by others
        with trio.fail_after(10):
            assert await reader.dht.get_value(kdht.manifest_key(pub.manifest_id)) == raw
        n.cancel_scope.cancel()


class _AcceptAll(kdht.Validator):
    def validate(self, key, value):
        return None

    def select(self, key, values):
        return 0
