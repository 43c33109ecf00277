"""A fetch builds the KV from its pieces as they verify (Node.fetch's `on_verified` into a
kvnet.artifact.KVBuilder), so that loading reads nothing back from the disk: every newly fetched piece
reaches the builder once, a liar's bytes never do, pieces the store already held are left to
`load_prefix`, and the KV is exactly what the publisher computed."""

from __future__ import annotations

import pytest
import torch
import trio

from kvnet import artifact
from kvnet.publish import publish_tokens
from kvnet.reuse import load_prefix
from tests.conftest import random_tokens
from tests.p2p.conftest import found_by, make_node, pid
from tests.p2p.test_lying_providers import LyingServer

HELD = {0, 5, 6}  # pieces the fetcher's store holds before the fetch


@pytest.mark.trio
@pytest.mark.parametrize("bulk", ["tls", None])
async def test_the_fetch_builds_the_published_kv_and_the_load_reads_only_what_it_did_not_fetch(
        tmp_path, tiny_bf16, bulk):
    doc = random_tokens(3000, seed=47)
    honest = make_node(tmp_path, "H", timeout=2.0)
    liar = make_node(tmp_path, "L", timeout=2.0, bulk_listen=None)  # flips a bit of every piece it sends
    pub = publish_tokens(tiny_bf16, honest.store, honest.key, doc, piece_size=16384)  # 47 pieces
    sm, mid = pub.signed, pub.manifest_id
    pieces = [honest.store.read_piece(mid, i) for i in range(len(sm.manifest.pieces))]
    liar.store.put_manifest(sm.raw)
    liar.store.put_pieces(mid, list(enumerate(pieces)))
    liar.server = LyingServer(liar.runner, "flip")
    client = make_node(tmp_path, "C", timeout=2.0)
    client.store.put_manifest(sm.raw)
    client.store.put_pieces(mid, [(i, pieces[i]) for i in HELD])
    heard: list[int] = []
    builder = artifact.KVBuilder(sm.manifest, tiny_bf16)

    def on_verified(i: int, data) -> None:
        heard.append(i)
        builder.add(i, data)

    async with trio.open_nursery() as n:
        boot = await n.start(honest.run)
        for node in (liar, client):
            node.bootstrap = [boot.addrs[0]]
            await n.start(node.run)
        found = await found_by(client, mid, {pid(honest), pid(liar)})
        client.scores.good(pid(liar), 50)  # the liar first in line: it is certainly asked
        result = await client.fetch(found, window=2, batch=4, bulk=bulk, on_verified=on_verified)
        n.cancel_scope.cancel()
    assert liar.server.requests >= 1 and result.providers[pid(liar)]["dropped"] is not None
    assert sorted(heard) == sorted(set(range(len(pieces))) - HELD)  # each fetched piece once, held ones never
    assert builder.missing() == sorted(HELD)
    kv = load_prefix(tiny_bf16, client.store, mid, builder=builder)  # reads the held pieces only
    own = tiny_bf16.prefill(doc)
    for got, want in zip(kv.keys + kv.values, own.keys + own.values, strict=True):
        assert torch.equal(got, want)
