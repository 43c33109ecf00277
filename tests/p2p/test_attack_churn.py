"""Connection churn and refusal, with real raw py-libp2p hosts as the attackers.

Issue 7's first finding: after about 250 inbound connections over its lifetime (peers connecting and
disconnecting one after another, fresh identities), a node refused every new connection for good,
because py-libp2p 0.8.1 freed an inbound slot only at host shutdown (kvnet.p2p.compat section 4).
Here 1000 fresh identities churn through one kvnet node; its inbound slots, connections, fds, trio
tasks and RSS must come back to their baseline, and an honest fetch from it must work right after.

The attackers run in a separate process (this file run as a script), unpatched stock py-libp2p
hosts, so every figure measured in the test process is the victim node's own. Also here: a node at its
inbound limit refuses and takes connections again once slots free; a `kvnet fetch` refused a
connection is one error line; a stream flood on one connection is capped (MAX_STREAMS_PER_CONNECTION).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import pytest
import trio
from libp2p.network.config import ConnectionConfig

from kvnet.p2p import compat
from kvnet.p2p.host import MAX_INBOUND_CONNECTIONS, REFUSED_HINT
from kvnet.p2p.stats import fds_open, trio_tasks
from tests.artifacts import ROOT, fake_artifact
from tests.p2p.conftest import make_node, rss_mb

CHURN_PEERS = 1000
CHURN_CONCURRENCY = 32  # attackers connected at once: well below the 250 inbound slots
ATTACKER_DIAL_TIMEOUT = 20.0
FD_MARGIN = 4  # fds/tasks that may differ from the baseline (a lingering close, a DHT refresh task)
TASK_MARGIN = 4
RSS_GROWTH_LIMIT_MB = 64  # measured: +4 to +5 MB for 1000 peers


def _snapshot(node) -> dict[str, float]:
    gc.collect()
    swarm = node.host.get_network()
    return {"inbound_slots": compat.inbound_slots_in_use(swarm), "connections": len(swarm.get_connections()),
            "fds": fds_open(), "tasks": trio_tasks(), "rss_mb": round(rss_mb(), 1),
            "peerstore": len(node.host.get_peerstore().peer_ids())}


async def _churn(addr: str, n: int, concurrency: int) -> dict:
    """Run the attacker process: `n` fresh identities connect, then disconnect, `concurrency` at a time."""
    proc = await trio.run_process([sys.executable, __file__, addr, str(n), str(concurrency)], capture_stdout=True,
                                  capture_stderr=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


async def _settled(node, timeout: float = 15.0) -> None:
    """Wait until the node has dropped every attacker connection (closes run a 0.1 s sleep each)."""
    swarm = node.host.get_network()
    with trio.move_on_after(timeout):
        while compat.inbound_slots_in_use(swarm) or swarm.get_connections():
            await trio.sleep(0.1)
    await trio.sleep(0.5)


@pytest.mark.trio
async def test_1000_fresh_peers_churning_leave_slots_fds_and_tasks_at_baseline(tmp_path):
    sm, pieces = fake_artifact(7, 2, piece_size=256 * 1024)
    victim = make_node(tmp_path, "victim")
    victim.store.put_manifest(sm.raw)
    victim.store.put_pieces(sm.id, list(enumerate(pieces)))
    async with trio.open_nursery() as n:
        await n.start(victim.run)
        addr = victim.addrs[0]
        assert compat.inbound_slots_total(victim.host.get_network()) == MAX_INBOUND_CONNECTIONS
        await _churn(addr, 20, 4)  # warm-up: lazily built state is not a leak
        await _settled(victim)
        before = _snapshot(victim)
        churn = await _churn(addr, CHURN_PEERS, CHURN_CONCURRENCY)
        await _settled(victim)
        after = _snapshot(victim)
        print(f"\nchurn of {CHURN_PEERS} peers ({CHURN_CONCURRENCY} at once): {churn}\nbefore {before}\nafter  {after}")

        # every attacker got in: with upstream's leak, the 251st and every later one were refused
        assert churn["connected"] == CHURN_PEERS, churn
        assert churn["max_open_seen_by_attackers"] <= CHURN_CONCURRENCY
        assert after["inbound_slots"] == before["inbound_slots"] == 0
        assert after["connections"] == before["connections"] == 0
        assert after["fds"] <= before["fds"] + FD_MARGIN
        assert after["tasks"] <= before["tasks"] + TASK_MARGIN
        assert after["rss_mb"] - before["rss_mb"] <= RSS_GROWTH_LIMIT_MB

        # an honest fetch bootstrapping off the churned node works right after
        client = make_node(tmp_path, "client", [addr])
        await n.start(client.run)
        assert client.bootstrap_reached == [addr]
        found = await client.find_manifest(sm.id)
        assert found is not None and found.providers[0].peer == victim.peer_id.to_base58()
        await client.fetch(found, sm.manifest.n_tokens)
        assert client.store.missing_pieces(sm.id) == [] and client.store.check() == []
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_full_node_refuses_and_frees_the_slot_when_the_connection_closes(tmp_path):
    """With every inbound slot taken the node refuses; the slot of a closed connection is usable again."""
    victim = make_node(tmp_path, "victim")
    async with trio.open_nursery() as n:
        await n.start(victim.run)
        swarm = victim.host.get_network()
        limiter = swarm._inbound_limiter
        holders = [object() for _ in range(compat.inbound_slots_total(swarm) - 1)]
        for h in holders:  # all but one slot taken, as by 249 connected strangers
            limiter.acquire_on_behalf_of_nowait(h)
        try:
            first = await _churn(victim.addrs[0], 5, 1)  # one at a time: each reuses the one free slot
            assert first["connected"] == 5, first
            await _settled(victim)
            assert compat.inbound_slots_in_use(swarm) == len(holders)
            limiter.acquire_on_behalf_of_nowait(swarm)  # now the last slot too
            refused = await _churn(victim.addrs[0], 3, 3)  # each refused dial retries for ~6 s
            assert refused["connected"] == 0 and refused["failed"] == 3, refused
        finally:
            limiter.release_on_behalf_of(swarm)
            for h in holders:
                limiter.release_on_behalf_of(h)
        again = await _churn(victim.addrs[0], 3, 3)
        assert again["connected"] == 3, again
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_fetch_refused_a_connection_is_one_error_line(tmp_path):
    """`kvnet fetch` off a node that refuses every connection: one `error:` line, exit 1, no traceback."""
    from kvnet import identity

    victim = make_node(tmp_path, "victim")
    home = tmp_path / "fetcher"
    identity.generate(home / "identity.key")
    async with trio.open_nursery() as n:
        await n.start(victim.run)
        addr = victim.addrs[0]
        swarm = victim.host.get_network()
        for _ in range(compat.inbound_slots_total(swarm)):
            swarm._inbound_limiter.acquire_on_behalf_of_nowait(object())
        proc = await trio.run_process(
            [sys.executable, "-m", "kvnet.cli", "fetch", "--home", str(home), "--bootstrap", addr,
             "--manifest", "00" * 32], capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
        n.cancel_scope.cancel()
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "no bootstrap peer reachable" in lines[0] and addr in lines[0], err
    assert REFUSED_HINT in lines[0], lines[0]  # says what happened, not "failed to negotiate" alone


def test_only_a_connection_closed_before_the_handshake_gets_the_refusal_hint(tmp_path):
    """A dead port (nobody listening) is not reported as a refusal."""
    from functools import partial

    from kvnet import identity
    from kvnet.p2p import commands
    from tests.p2p.test_bootstrap import _dead_addr

    identity.generate(tmp_path / "identity.key")
    node = commands.open_node(tmp_path, None, [_dead_addr()])
    outcome = commands.run_trio(partial(commands.fetch, node, manifest_id=bytes(32)))
    assert outcome.error.startswith("no bootstrap peer reachable") and REFUSED_HINT not in outcome.error


@pytest.mark.trio
async def test_a_stream_flood_on_one_connection_is_capped_and_others_are_served(tmp_path):
    """A stock py-libp2p host opens 200 idle offer streams on its one connection: the node handles
    MAX_STREAMS_PER_CONNECTION of them and resets the rest, and an honest fetch meanwhile succeeds."""
    import multiaddr
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from kvnet.p2p.host import MAX_STREAMS_PER_CONNECTION, keypair
    from kvnet.p2p.server import OFFER_PROTOCOL

    sm, pieces = fake_artifact(8, 1, piece_size=256 * 1024)
    victim = make_node(tmp_path, "victim")
    victim.store.put_manifest(sm.raw)
    victim.store.put_pieces(sm.id, list(enumerate(pieces)))
    attacker = new_host(key_pair=keypair(Ed25519PrivateKey.generate()),
                        connection_config=ConnectionConfig(max_connections_per_peer=1))
    opened: list = []
    refused = 0
    async with trio.open_nursery() as n:
        await n.start(victim.run)
        addr = victim.addrs[0]
        async with attacker.run(listen_addrs=[]):
            await attacker.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))

            async def idle_stream() -> None:
                nonlocal refused
                try:
                    with trio.fail_after(20):
                        opened.append(await attacker.new_stream(victim.peer_id, [OFFER_PROTOCOL]))
                except Exception:  # noqa: BLE001 - a reset stream fails its negotiation
                    refused += 1

            async with trio.open_nursery() as flood:
                for _ in range(200):
                    flood.start_soon(idle_stream)
            conn = victim.host.get_network().get_connections(attacker.get_id())[0]
            assert len(opened) <= MAX_STREAMS_PER_CONNECTION and refused >= 200 - MAX_STREAMS_PER_CONNECTION
            assert conn._kvnet_refused_streams == refused
            # the flood's streams are still open and idle: an honest peer is served meanwhile
            client = make_node(tmp_path, "client", [addr])
            await n.start(client.run)
            found = await client.find_manifest(sm.id)
            assert found is not None
            await client.fetch(found, sm.manifest.n_tokens)
            assert client.store.missing_pieces(sm.id) == []
            print(f"\nstream flood: {len(opened)} handled, {refused} reset")
        n.cancel_scope.cancel()


# -- the attacker process ----------------------------------------------------------------------


async def _attack(addr: str, n: int, concurrency: int) -> dict:
    """`n` stock py-libp2p hosts, each a fresh Ed25519 identity: connect, then disconnect and stop."""
    import multiaddr
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr

    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    stats = {"connected": 0, "failed": 0, "max_open_seen_by_attackers": 0, "first_error": None}
    open_now = 0
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        nonlocal open_now
        async with limiter:
            host = new_host(connection_config=ConnectionConfig(max_connections_per_peer=1))
            try:
                async with host.run(listen_addrs=[]):
                    with trio.fail_after(ATTACKER_DIAL_TIMEOUT):
                        await host.connect(info)
                    open_now += 1
                    stats["max_open_seen_by_attackers"] = max(stats["max_open_seen_by_attackers"], open_now)
                    stats["connected"] += 1
                    await host.disconnect(info.peer_id)
                    open_now -= 1
            except Exception as exc:  # noqa: BLE001 - a refused dial is what is counted
                stats["failed"] += 1
                stats["first_error"] = stats["first_error"] or repr(exc)[:300]

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return stats


if __name__ == "__main__":
    import logging

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    print(json.dumps(trio.run(_attack, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
