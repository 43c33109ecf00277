"""A running node's resource use as one flat JSON object, written atomically to a file.

Why: attacks on a node (issue 7) are measured on a separate `kvnet serve` process, so what it holds
(connections, inbound slots, streams, tasks, fds, memory, DHT records, peer scores) must be visible
from outside without a debugger. `kvnet serve --stats-file PATH [--stats-interval S]` rewrites PATH
every S seconds (default STATS_INTERVAL_S) by writing `PATH.tmp` and renaming it over PATH, so a
reader never sees a half-written file. This is also the seed of the daemon's metrics, so every
field is a plain number (or string) under a plain name, and new fields are only ever added:

| field | meaning |
|---|---|
| `time` | Unix time of the snapshot (s, float) |
| `uptime_s` | seconds since the stats loop started |
| `pid` | the node's process id |
| `peer_id` | the node's peer id (base58) |
| `connections_in` | open connections the remote side dialed |
| `connections_out` | open connections this node dialed |
| `connections` | all open connections (in + out + any of unknown direction) |
| `inbound_slots_in_use` | inbound connection slots taken (py-libp2p's inbound limiter) |
| `inbound_slots_total` | inbound connection slots in all |
| `streams_open` | open streams over all connections |
| `trio_tasks` | tasks alive in the node's trio run |
| `fds_open` | open file descriptors of the process |
| `rss_mb` | resident memory of the process (MiB, one decimal) |
| `peerstore_peers` | peers in the peerstore |
| `routing_table_peers` | peers in the DHT routing table |
| `dht_provider_keys` | keys with at least one provider record held |
| `dht_provider_entries` | provider records held (one per key and provider) |
| `dht_values` | DHT values (signed manifests) held |
| `dht_value_bytes` | bytes of those values |
| `dht_refused` | DHT streams reset by a rule or a deadline since start |
| `dht_timed_out` | of which by a deadline |
| `serve_refused` | offer/pieces requests refused since start (all codes) |
| `peers_scored` | peers with a score in the node's score file |
| `peers_avoided` | of which scored below the avoid threshold |

A field the running versions cannot measure (no /proc, no score file) is -1, never missing.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import trio

from kvnet.p2p import compat
from kvnet.p2p.scores import AVOID_BELOW

STATS_INTERVAL_S = 5.0
FIELDS = ("time", "uptime_s", "pid", "peer_id", "connections_in", "connections_out", "connections",
          "inbound_slots_in_use", "inbound_slots_total", "streams_open", "trio_tasks", "fds_open", "rss_mb",
          "peerstore_peers", "routing_table_peers", "dht_provider_keys", "dht_provider_entries", "dht_values",
          "dht_value_bytes", "dht_refused", "dht_timed_out", "serve_refused", "peers_scored", "peers_avoided")


def _direction(conn: Any) -> str:
    """'in', 'out' or '?' for a SwarmConn (py-libp2p 0.8.1 tags each with a Direction enum)."""
    name = str(getattr(getattr(conn, "direction", None), "name", "")).upper()
    return {"INBOUND": "in", "OUTBOUND": "out"}.get(name, "?")


def trio_tasks() -> int:
    """Tasks alive in the current trio run (the node's, plus whatever else shares its loop)."""
    stack, n = [trio.lowlevel.current_root_task()], 0
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


def fds_open() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return -1.0


def _scores(scores: Any) -> tuple[int, int]:
    """(peers scored, peers avoided), read from the node's score table."""
    db = getattr(scores, "db", None)
    if db is None:
        return -1, -1
    with getattr(scores, "_lock", None) or nullcontext():
        row = db.execute("SELECT COUNT(*), COALESCE(SUM(score < ?), 0) FROM scores", (AVOID_BELOW,)).fetchone()
    return int(row[0]), int(row[1])


def _dht(dht: Any) -> dict[str, int]:
    providers = getattr(dht.provider_store, "providers", {})
    values = dht.value_store
    guard = getattr(dht, "kvnet_guard", None)
    return {"routing_table_peers": int(dht.routing_table.size()),
            "dht_provider_keys": len(providers),
            "dht_provider_entries": sum(len(v) for v in providers.values()),
            "dht_values": len(getattr(values, "store", {})),
            "dht_value_bytes": int(getattr(values, "total_bytes", -1)),
            "dht_refused": int(getattr(guard, "refused", -1)),
            "dht_timed_out": int(getattr(guard, "timed_out", -1))}


def node_stats(node: Any, started: float | None = None) -> dict[str, Any]:
    """One snapshot of `node` (a kvnet.p2p.node.Node, running), as the module docstring's fields.

    Must run inside the node's trio run (it counts that run's tasks)."""
    swarm = node.host.get_network()
    conns = swarm.get_connections()
    dirs = [_direction(c) for c in conns]
    scored, avoided = _scores(node.scores)
    now = time.time()
    out: dict[str, Any] = {
        "time": round(now, 3), "uptime_s": round(now - started, 1) if started else 0.0, "pid": os.getpid(),
        "peer_id": node.peer_id.to_base58(),
        "connections_in": dirs.count("in"), "connections_out": dirs.count("out"), "connections": len(conns),
        "inbound_slots_in_use": compat.inbound_slots_in_use(swarm),
        "inbound_slots_total": compat.inbound_slots_total(swarm),
        "streams_open": sum(len(getattr(c, "streams", ())) for c in conns),
        "trio_tasks": trio_tasks(), "fds_open": fds_open(), "rss_mb": rss_mb(),
        "peerstore_peers": len(node.host.get_peerstore().peer_ids()),
        **_dht(node.dht),
        "serve_refused": sum(getattr(node.server, "refused", {}).values()),
        "peers_scored": scored, "peers_avoided": avoided,
    }
    return {k: out[k] for k in FIELDS}


def write_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as JSON to `path` via `path.tmp` + rename: readers see the old or the new file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=False) + "\n")
    os.replace(tmp, path)


async def stats_loop(node: Any, path: Path, interval: float = STATS_INTERVAL_S) -> None:
    """Rewrite `path` with `node_stats(node)` now and every `interval` seconds, until cancelled.

    A failed write (disk full, directory removed) is retried next tick: stats never stop a node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    while True:
        with suppress(OSError):
            write_atomic(path, node_stats(node, started))
        await trio.sleep(interval)
