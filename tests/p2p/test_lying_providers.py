"""Three providers, one lying (flipped bytes, a short piece, a stall): the fetch completes with the
right bytes from the honest ones, the liar is dropped, asked nothing more, and scored down persistently."""

import pytest
import trio

from kvnet.p2p import wire
from kvnet.p2p.scores import PeerScores
from kvnet.p2p.server import PieceServer, piece_indices
from kvnet.publish import publish_tokens
from tests.conftest import random_tokens
from tests.p2p.conftest import found_by, make_node

WINDOW = 2  # concurrent requests per provider in these fetches


class LyingServer(PieceServer):
    """Answers piece requests, but every piece it sends is wrong in the chosen way."""

    def __init__(self, runner, mode: str) -> None:
        super().__init__(runner)
        self.mode = mode
        self.requests = 0  # piece requests received

    async def _pieces(self, stream) -> None:
        req = await wire.read_frame(stream, wire.MAX_REQUEST)
        self.requests += 1
        mid = req["manifest"]
        for i in piece_indices(req["ranges"]):
            data = bytearray(await self.runner.call(self.runner.store.read_piece, mid, i))
            if self.mode == "flip":
                data[len(data) // 2] ^= 0x01
            elif self.mode == "short":
                await wire.write_frame(stream, {"i": i, "n": len(data)})
                await stream.write(bytes(data[:-100]))
                await stream.close()
                return
            elif self.mode == "stall":
                await wire.write_frame(stream, {"i": i, "n": len(data)})
                await trio.sleep_forever()
            elif self.mode == "wrong_length":
                data = data[:-1]
            await wire.write_frame(stream, {"i": i, "n": len(data)})
            await stream.write(bytes(data))
        await wire.write_frame(stream, {"done": True})


@pytest.mark.trio
@pytest.mark.parametrize("mode", ["flip", "short", "stall", "wrong_length"])
async def test_fetch_routes_around_a_liar(tmp_path, tiny_bf16, mode):
    doc = random_tokens(3000, seed=41)
    honest1, honest2 = (make_node(tmp_path, n, timeout=2.0) for n in ("H1", "H2"))
    liar = make_node(tmp_path, "L", timeout=2.0, bulk_listen=None)  # lies on `pieces` streams (bulk: test_bulk.py)
    pub = publish_tokens(tiny_bf16, honest1.store, honest1.key, doc, piece_size=16384)  # 47 pieces
    for other in (honest2, liar):
        other.store.put_manifest(pub.signed.raw)
        for i in range(len(pub.signed.manifest.pieces)):
            other.store.put_piece(pub.manifest_id, i, honest1.store.read_piece(pub.manifest_id, i))
    liar.server = LyingServer(liar.runner, mode)
    client = make_node(tmp_path, "C", timeout=2.0)
    async with trio.open_nursery() as n:
        boot = await n.start(honest1.run)
        for node in (honest2, liar, client):
            node.bootstrap = [boot.addrs[0]]
            await n.start(node.run)
        found = await found_by(client, pub.manifest_id, {x.peer_id.to_base58() for x in (honest1, honest2, liar)})
        # make the liar first in line, so it is certainly asked for pieces first
        before = client.scores.good(liar.peer_id.to_base58(), 50)
        result = await client.fetch(found, found.signed.manifest.n_tokens, window=WINDOW, batch=4)
        await trio.sleep(2.5)  # a stall outlasting the fetch is detected in the background at its timeout
        n.cancel_scope.cancel()
    liar_id = liar.peer_id.to_base58()
    assert liar_id in result.providers
    # Every response of the liar is bad from its first piece on, so each of its WINDOW request slots
    # sent exactly one request before the first lie was caught, and none after: a liar that is
    # scored down gets no further requests in this fetch.
    # (a staller is dropped in the background after the result was returned, so only the others show it there)
    assert mode == "stall" or result.providers[liar_id]["dropped"] is not None
    assert 1 <= liar.server.requests <= WINDOW
    assert client.store.missing_pieces(pub.manifest_id) == []
    assert client.store.check() == []  # every stored byte verifies
    after = client.scores.get(liar_id)
    assert after <= before - 4  # minus a small credit for the good pieces it sent first
    # the score persists across restarts of the client
    assert PeerScores(tmp_path / "C" / "scores.sqlite").get(liar_id) == after


@pytest.mark.trio
async def test_a_peer_with_a_low_score_is_avoided_later(tmp_path, tiny_bf16):
    doc = random_tokens(2000, seed=42)
    honest, liar = make_node(tmp_path, "H", timeout=2.0), make_node(tmp_path, "L", timeout=2.0)
    pub = publish_tokens(tiny_bf16, honest.store, honest.key, doc, piece_size=16384)
    liar.store.put_manifest(pub.signed.raw)
    liar.store.put_pieces(pub.manifest_id, [(i, honest.store.read_piece(pub.manifest_id, i))
                                            for i in range(len(pub.signed.manifest.pieces))])
    liar.server = LyingServer(liar.runner, "flip")
    liar_id = liar.peer_id.to_base58()
    PeerScores(tmp_path / "C" / "scores.sqlite").bad(liar_id, "bad_piece")  # an earlier fetch caught it
    PeerScores(tmp_path / "C" / "scores.sqlite").bad(liar_id, "bad_piece")
    client = make_node(tmp_path, "C", timeout=2.0)  # a restarted node: scores come from disk
    assert client.scores.avoided(liar_id)
    async with trio.open_nursery() as n:
        boot = await n.start(honest.run)
        for node in (liar, client):
            node.bootstrap = [boot.addrs[0]]
            await n.start(node.run)
        found = await found_by(client, pub.manifest_id, {honest.peer_id.to_base58(), liar_id})
        result = await client.fetch(found, found.signed.manifest.n_tokens)
        n.cancel_scope.cancel()
    assert result.providers[liar_id] == {"pieces": 0, "bytes": 0, "dropped": None}  # never asked
    assert liar.server.served_pieces == 0
    assert client.store.missing_pieces(pub.manifest_id) == []
