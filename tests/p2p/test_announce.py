"""Announcing: few records, in the background, for what appears in the store, never per arriving peer.

Counts, not timings: every node counts the provider records it sends (`Node.stats.provides`).
Real libp2p nodes on loopback; waits are bounded loops on an observable condition.
"""

from __future__ import annotations

import pytest
import trio

from kvnet.p2p import commands
from kvnet.p2p import dht as kdht
from kvnet.p2p.node import GrowthPolicy
from kvnet.store import Store
from tests.artifacts import fake_artifact
from tests.p2p.conftest import make_node

# 2 MiB of tiny-shaped KV (256 B/token): 8192 tokens = 32 blocks, in 8 pieces of 256 KiB.
RECORDS = 1 + 6  # the manifest id + the chain keys at 1, 2, 4, 8, 16 and 32 blocks


def _artifact(seed: int = 61):
    return fake_artifact(seed, 2, piece_size=1 << 18)


def _hold(node, sm, pieces) -> None:
    node.store.put_manifest(sm.raw)
    node.store.put_pieces(sm.id, list(enumerate(pieces)))


async def _until(condition, limit: float = 30.0, step: float = 0.05) -> None:
    """Wait (bounded) until `condition()` holds; the bound only stops a broken run from hanging."""
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(step)


def test_the_fake_artifact_has_the_expected_records():
    sm, _ = _artifact()
    assert len(kdht.announce_keys(sm.manifest, sm.id, set(range(len(sm.manifest.pieces))))) == RECORDS


def test_growth_reannounces_only_when_the_table_doubles():
    g = GrowthPolicy(min_interval_s=0)
    g.announced(1)
    fired = []
    for size in range(2, 17):  # one peer arrives at a time
        if g.due(size, float(size)):
            g.growth_announced(size, float(size))
            fired.append(size)
    assert fired == [2, 4, 8, 16]  # 4 rounds for 15 arrivals (the old rule: 15)


def test_growth_reannounces_at_most_once_a_minute():
    g = GrowthPolicy(min_interval_s=60)
    g.announced(1)
    fired = []
    for t in range(0, 198):  # a peer arrives every second
        if g.due(t + 2, float(t)):
            g.growth_announced(t + 2, float(t))
            fired.append(t)
    assert fired == [0, 60, 122]  # 60 s apart at least, and only once the table doubled again


@pytest.mark.trio
async def test_arriving_peers_do_not_trigger_a_full_announcement_each(tmp_path):
    sm, pieces = _artifact()
    provider = make_node(tmp_path, "P", growth_check_s=0.05)
    _hold(provider, sm, pieces)
    async with trio.open_nursery() as n:
        p = await n.start(provider.run)
        assert p.stats.provides == RECORDS and p.stats.rounds == 1
        for i in range(6):
            checks = p.stats.growth_checks
            await n.start(make_node(tmp_path, f"N{i}", [p.addrs[0]]).run)
            await _until(lambda c=checks: p.stats.growth_checks >= c + 2)  # the loop saw this arrival
        assert p.dht.routing_table.size() >= 4
        n.cancel_scope.cancel()
    # one growth round (the first peer after a start with an empty table); the old rule re-announced
    # everything on every growth of the table, here 6 more rounds
    assert p.stats.growth_rounds == 1
    assert p.stats.provides == 2 * RECORDS


@pytest.mark.trio
async def test_a_serving_node_announces_a_fetch_in_the_background_and_a_fetch_only_node_not_at_all(tmp_path):
    sm, pieces = _artifact()
    provider = make_node(tmp_path, "P")
    _hold(provider, sm, pieces)
    async with trio.open_nursery() as n:
        p = await n.start(provider.run)
        server = await n.start(make_node(tmp_path, "S", [p.addrs[0]]).run)
        found = await server.find_manifest(sm.id)
        await server.fetch(found)
        await _until(lambda: server.stats.provides == RECORDS)  # after fetch returned
        assert server.store.missing_pieces(sm.id) == []

        fetcher = make_node(tmp_path, "F", [p.addrs[0]])
        outcome = await commands.fetch(fetcher, manifest_id=sm.id)
        assert outcome.error is None and outcome.result.fetched == len(pieces)
        n.cancel_scope.cancel()
    assert server.stats.provides == RECORDS  # each record once, however the pieces arrived
    assert (fetcher.stats.provides, fetcher.stats.values) == (0, 0)
    holders = {info.peer_id for info in p.dht.provider_store.get_providers(sm.id)}
    assert server.peer_id in holders and fetcher.peer_id not in holders


@pytest.mark.trio
async def test_an_artifact_stored_by_another_writer_is_announced_without_a_restart(tmp_path):
    sm, pieces = _artifact(62)
    serving = make_node(tmp_path, "S", watch_s=0.2)
    async with trio.open_nursery() as n:
        s = await n.start(serving.run)
        reader = await n.start(make_node(tmp_path, "R", [s.addrs[0]]).run)
        assert s.stats.provides == 0  # an empty store announces nothing
        with Store(tmp_path / "S" / "store") as other:  # a second handle, like `kvnet publish` would use
            other.put_manifest(sm.raw)
            other.put_pieces(sm.id, list(enumerate(pieces)))
        await _until(lambda: s.stats.provides == RECORDS)
        found = await reader.find_manifest(sm.id)
        assert found is not None and [pr.peer for pr in found.providers] == [s.peer_id.to_base58()]
        ticks = s.stats.watch_ticks
        await _until(lambda: s.stats.watch_ticks >= ticks + 3)
        n.cancel_scope.cancel()
    assert s.stats.rounds == 1 and s.stats.provides == RECORDS  # nothing re-announced on later polls


@pytest.mark.trio
async def test_libp2p_does_not_republish_kvnet_records_on_its_own(tmp_path):
    """kvnet republishes from its store; py-libp2p's own republisher (every key ever provided, in its
    maintenance loop) must find nothing to do, or evicted artifacts would be announced for ever."""
    sm, pieces = _artifact()
    provider = make_node(tmp_path, "P")
    _hold(provider, sm, pieces)
    async with trio.open_nursery() as n:
        p = await n.start(provider.run)
        assert p.stats.provides == RECORDS
        assert p.dht.provider_store.providing_keys == set()
        store = p.dht.provider_store
        calls = []
        real = store.provide

        async def counted(key: bytes) -> bool:
            calls.append(key)
            return await real(key)

        store.provide = counted
        await store._republish_provider_records()
        assert calls == []
        n.cancel_scope.cancel()
