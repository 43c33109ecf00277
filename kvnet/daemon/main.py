"""`kvnet-node --config node.toml`: the long-running node (trio), serving peers and the agent socket.

Start order, so a mistake costs no wait and nothing half-starts: config -> data-dir lock -> identity
(created at first start) -> the socket path is free -> the model (loaded once, warmed up) -> the store
and the ledger (`<data_dir>/ledger.sqlite`, as `kvnet serve` keeps it) -> the node joins the network
with the `[prices]` of node.toml (its hosting fee, credit window and spending limits) -> the agent
socket accepts -> one JSON `ready` line on stdout.
SIGTERM / SIGINT: stop accepting agents, cancel generations and transfers (a fetch cancelled midway
has recorded every receipt it signed: each is committed before it is sent), close (flush) the store
and the ledger, remove the socket file, release the lock. A restart on the same data dir keeps the
store, the peer scores and the ledger, and the node announces what it holds again as it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import trio

from kvnet import identity, logs
from kvnet.daemon import config as cfgmod
from kvnet.daemon.lock import DataDirLock
from kvnet.daemon.logfmt import use_json
from kvnet.daemon.metrics import Metrics
from kvnet.errors import KvnetError, first_kvnet_error

log = logging.getLogger("kvnet.daemon")
GRACE_S = 2.0  # how long in-flight agent requests get after SIGTERM before they are cancelled


class SocketInUse(KvnetError):
    """The agent socket path is served by a live process (another node with the same agent.socket)."""


def _check_socket_free(path: Path) -> None:
    """Refuse a path another live process serves; remove a stale socket file a dead node left."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"agent.socket {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a node that was SIGKILLed left it
        return
    finally:
        probe.close()
    raise SocketInUse(f"agent.socket {path} is served by another running process; give this node its own path")


def _key(path: Path):
    if not path.exists():
        log.warning("no identity key at %s: creating one (back it up: it is this node's identity)", path)
        return identity.generate(path)
    return identity.load(path)


def _refusal() -> bytes:
    """The whole HTTP answer to a connection over `agent.max_connections`: 503 in the OpenAI error shape."""
    from kvnet.daemon.openai_api import ApiError

    body = json.dumps(ApiError(503, "too many open connections to the agent socket (agent.max_connections); "
                                    "close one or retry later", "server_error",
                               code="too_many_connections").body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode() + body


def hypercorn_config(agent: cfgmod.AgentConfig, binds: list[str]):
    """Hypercorn's config for one agent listener, with its own connection gate (kvnet/daemon/compat.py).

    No `read_timeout`: it would drop a client that waits, silent, for a long non-streaming answer; the
    body deadline is the app's (`app.read_json`), the head's the keep-alive timer's (Hypercorn runs it
    from the connection's start, or the last answer, until a complete head arrives)."""
    from kvnet.daemon.compat import ConnectionGate, GatedConfig

    hc = GatedConfig()
    hc.bind = binds
    hc.umask = 0o177  # the socket file is created 0600: owner only
    hc.graceful_timeout = GRACE_S
    hc.keep_alive_timeout = agent.keep_alive_timeout_s
    hc.h2_max_concurrent_streams = 1  # h2 (prior knowledge or h2c) may not multiply one connection's requests
    hc.accesslog = None
    hc.errorlog = logging.getLogger("kvnet.daemon.http")
    hc.gate = ConnectionGate(agent.max_connections, agent.send_timeout_s, _refusal())
    return hc


async def _serve_agents(app, hc, shutdown: trio.Event, task_status=trio.TASK_STATUS_IGNORED):
    from hypercorn.trio import serve

    await serve(app, hc, shutdown_trigger=shutdown.wait, task_status=task_status)


async def _run(cfg: cfgmod.NodeConfig, engine, node, key, metrics: Metrics) -> None:
    from kvnet.daemon.app import BearerAuth, build_app
    from kvnet.daemon.service import Service

    svc = Service(cfg, engine, node, key, metrics)
    await trio.to_thread.run_sync(svc.warm_up)
    app = build_app(svc)
    sock = cfg.socket_path
    on_socket = hypercorn_config(cfg.agent, [f"unix:{sock}"])
    listeners = [on_socket]
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            svc.nursery = nursery
            await nursery.start(node.run)
            await nursery.start(svc.scheduler.run)
            nursery.start_soon(svc.refresh_metrics)
            async with trio.open_nursery() as agents:
                await agents.start(_serve_agents, app, on_socket, shutdown)
                os.chmod(sock, 0o600)
                if cfg.agent.tcp_port:
                    on_tcp = hypercorn_config(cfg.agent, [f"127.0.0.1:{cfg.agent.tcp_port}"])
                    await agents.start(_serve_agents, BearerAuth(app, cfg.agent.token), on_tcp, shutdown)
                    listeners.append(on_tcp)
                print(json.dumps({"ready": True, "socket": str(sock), "peer_id": node.peer_id.to_base58(),
                                  "addrs": node.addrs, "metrics": metrics.address, "pid": os.getpid()}),
                      flush=True)
                log.warning("kvnet-node ready: socket %s, peer %s", sock, node.peer_id.to_base58())
                async for sig in signals:
                    log.warning("signal %d: stopping (agents first, then transfers)", sig)
                    break
                shutdown.set()  # hypercorn stops accepting and gives in-flight requests GRACE_S
                for hc in listeners:
                    hc.gate.stop(GRACE_S)  # and writes to clients that do not read: no longer either
                agents.cancel_scope.deadline = trio.current_time() + GRACE_S + 1
            nursery.cancel_scope.cancel()  # transfers, announcements, generations


def _load_model(cfg: cfgmod.NodeConfig):
    """The engine, once; a folder that is not a usable Qwen3 checkpoint is one line naming model.ref."""
    from kvnet.engine import Engine

    try:
        return Engine(cfg.model.ref, cfg.model.dtype)
    except KvnetError:
        raise
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise cfgmod.ConfigError(f"model.ref: cannot load {cfg.model.ref!r}: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())}") from exc


def run(cfg: cfgmod.NodeConfig) -> None:
    from kvnet.ledger import Ledger
    from kvnet.p2p import commands
    from kvnet.p2p.node import Node
    from kvnet.p2p.server import HostingTerms
    from kvnet.store import Store

    lock = DataDirLock(cfg.data_dir).acquire()
    store = ledger = None
    sock = cfg.socket_path
    made_socket = False
    metrics = Metrics()
    try:
        key = _key(cfg.key_path)
        _check_socket_free(sock)
        sock.parent.mkdir(parents=True, exist_ok=True)
        engine = _load_model(cfg)
        store = Store(cfg.store_dir, capacity_bytes=cfg.store_capacity_mb * 2**20 or None)
        ledger = Ledger(cfg.ledger_path, key)  # LedgerError if it is another key's ledger
        logs.setup()  # libp2p was imported by now, which resets its logger
        p = cfg.prices
        node = Node(key, store, listen=list(cfg.listen), bootstrap=list(cfg.bootstrap),
                    scores_path=cfg.data_dir / "peer-scores.sqlite",
                    terms=HostingTerms(p.host_fee_per_mib, p.currency), ledger=ledger,
                    credit_window=p.window, spending=p.spending_limits())
        metrics.watch_ledger(ledger)
        logs.setup()
        if cfg.log.format == "json":
            use_json()
        if cfg.metrics:
            metrics.serve(cfg.metrics)
        made_socket = True
        commands.run_trio(_run, cfg, engine, node, key, metrics)
    finally:
        metrics.stop()
        if store is not None:
            store.close()
        if ledger is not None:
            ledger.close()  # every receipt was committed (synchronous=FULL) when it was signed or accepted
        if made_socket:
            try:
                if stat.S_ISSOCK(sock.lstat().st_mode):
                    sock.unlink()
            except FileNotFoundError:
                pass
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvnet-node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="node.toml (default: every field's default)")
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.load(args.config) if args.config else cfgmod.parse({}, Path.cwd())
        logs.setup(cfg.log.level)
        if cfg.log.format == "json":
            use_json()
        run(cfg)
    except (KvnetError, BaseExceptionGroup) as exc:
        err = first_kvnet_error(exc)
        if err is None:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
