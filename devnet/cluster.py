"""N real kvnet-node processes on loopback, each with its own temp dir, identity and node.toml.

Node 0 starts first; every other node bootstraps through it. `Cluster` is a context manager whose exit
stops every node (SIGTERM, then SIGKILL after a grace) and removes the temp dir, also when the
scenario failed or the user pressed Ctrl-C, and checks that no node process or socket file is left.
`start_liar` adds a devnet liar process (devnet/liar.py), stopped with the nodes. `DevNode`,
`write_config` and `start_node` are also the daemon tests' way to run a node (tests/daemon/nodes.py).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvnet.errors import KvnetError

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
DEFAULT_FEE_PER_MIB = 10  # every devnet node charges for hosting, so every reuse is paid for with receipts


class DevnetError(KvnetError):
    """A node did not start, or did not stop cleanly."""


@dataclass
class DevNode:
    """A handle on one running process of the devnet (a kvnet-node, or a devnet liar): its ready line.

    The daemon tests use it too (tests/daemon/nodes.py), so one piece of code starts and stops nodes."""

    name: str
    dir: Path
    proc: subprocess.Popen
    ready: dict
    config: Path | None = None
    tcp_port: int = 0  # the node's loopback TCP listener, when its config asks for one

    @property
    def socket(self) -> str:
        return self.ready["socket"]

    @property
    def addr(self) -> str:
        return self.ready["addrs"][0]

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    def http(self, timeout: float = 600.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://node", timeout=timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def write_config(dir_: Path, model: str = "tiny", dtype: str = "fp32", bootstrap: list[str] | None = None,
                 agent: dict | None = None, extra: str = "", log_format: str = "text",
                 fee_per_mib: int | None = None) -> Path:
    """<dir_>/node.toml for a loopback node; `extra`: more TOML lines before [model] (tests; a [prices]
    table there needs `fee_per_mib` None); `fee_per_mib`: a [prices] table with that hosting fee. The
    log level is info, or $KVNET_DEVNET_LOG_LEVEL (with KVNET_DEVNET_LOGS, to read a failed run)."""
    lines = [f'data_dir = "{dir_ / "data"}"', 'listen = ["/ip4/127.0.0.1/tcp/0"]', 'metrics = "127.0.0.1:0"',
             *([f"bootstrap = {json.dumps(bootstrap)}"] if bootstrap else []), extra,
             "[model]", f'ref = "{model}"', f'dtype = "{dtype}"',
             "[log]", f'level = "{os.environ.get("KVNET_DEVNET_LOG_LEVEL", "info")}"', f'format = "{log_format}"',
             *(["[prices]", f"host_fee_per_mib = {fee_per_mib}"] if fee_per_mib is not None else []),
             "[agent]", *(f"{k} = {json.dumps(v)}" for k, v in (agent or {}).items())]
    path = dir_ / "node.toml"
    dir_.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def env() -> dict[str, str]:
    """The environment of a devnet process: this checkout first on the import path."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def node_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "kvnet.daemon.main", "--config", str(config)]


def spawn(name: str, dir_: Path, argv: list[str], config: Path | None = None,
          started: list[DevNode] | None = None) -> DevNode:
    """Start a process that prints one JSON ready line on stdout (stderr goes to <dir_>/node.log) and wait
    for that line. In its own session, so a Ctrl-C reaches the devnet only, which stops it in order.
    The handle is appended to `started` before the wait, so a caller stops it even if it never got ready."""
    dir_.mkdir(parents=True, exist_ok=True)
    log = open(dir_ / "node.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env(), cwd=ROOT, start_new_session=True)
    log.close()
    node = DevNode(name, dir_, proc, {}, config)
    if started is not None:
        started.append(node)
    deadline, buf = time.monotonic() + START_TIMEOUT_S, b""
    while b"\n" not in buf:
        if time.monotonic() > deadline or proc.poll() is not None:
            if started is None:
                node.stop(1.0)
            tail = (dir_ / "node.log").read_text()[-1500:]
            raise DevnetError(f"{name} did not get ready:\n{tail}")
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if r:
            buf += os.read(proc.stdout.fileno(), 4096)
    node.ready = json.loads(buf.split(b"\n", 1)[0])
    return node


def start_node(config: Path, name: str | None = None, started: list[DevNode] | None = None) -> DevNode:
    """Start `kvnet-node --config <config>` and wait until it is ready (its socket accepts)."""
    return spawn(name or config.parent.name, config.parent, node_cmd(config), config, started)


class Cluster:
    def __init__(self, n: int, model: str = "tiny", dtype: str = "fp32", agent: dict | None = None,
                 fee_per_mib: int = DEFAULT_FEE_PER_MIB) -> None:
        if n < 1:
            raise DevnetError("a devnet needs at least one node")
        self.n, self.model, self.dtype, self.agent = n, model, dtype, agent or {}
        self.fee_per_mib = fee_per_mib  # every node's hosting fee (micro-units per MiB, node.toml [prices])
        self.tmp = Path(tempfile.mkdtemp(prefix="kvnet-devnet-"))
        self.nodes: list[DevNode] = []
        self.liars: list[DevNode] = []
        self.leftovers: list[str] = []
        self.killed: set[str] = set()

    def _start(self, name: str, bootstrap: list[str]) -> DevNode:
        cfg = write_config(self.tmp / name, self.model, self.dtype, bootstrap, self.agent,
                           fee_per_mib=self.fee_per_mib)
        return start_node(cfg, name, self.nodes)  # stopped on exit even if it never gets ready

    def start_liar(self, lie: str, manifest_id: str) -> DevNode:
        """A devnet liar process (devnet/liar.py) bootstrapped through node 0, lying about `manifest_id`;
        ready once its provider records are out. Stopped with the nodes."""
        name = f"liar-{lie}"
        argv = [sys.executable, "-m", "devnet.liar", "--dir", str(self.tmp / name), "--bootstrap",
                self.nodes[0].addr, "--manifest", manifest_id, "--lie", lie]
        return spawn(name, self.tmp / name, argv, started=self.liars)

    def kill(self, node: DevNode) -> None:
        """SIGKILL a node (churn): no clean shutdown, its socket file stays until its restart."""
        node.proc.kill()
        node.proc.wait(10)
        self.killed.add(node.name)  # its socket file is expected to stay (removed with the temp dir)

    def restart(self, node: DevNode) -> DevNode:
        """Start a killed node again on the same data dir, config and identity."""
        bootstrap = [] if node is self.nodes[0] else [self.nodes[0].addr]
        fresh = self._start(node.name, bootstrap)
        self.killed.discard(node.name)
        self.nodes.remove(fresh)
        self.nodes[self.nodes.index(node)] = fresh
        return fresh

    def __enter__(self) -> Cluster:
        try:
            first = self._start("node0", [])
            for i in range(1, self.n):
                self._start(f"node{i}", [first.addr])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def stop(self) -> None:
        every = self.nodes + self.liars
        for node in every:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in every:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.leftovers.append(f"{node.name}: did not stop on SIGTERM (killed)")
                node.proc.kill()
                node.proc.wait(10)
            if node.ready.get("socket") and node.name not in self.killed and os.path.exists(node.socket):
                self.leftovers.append(f"{node.name}: socket file {node.socket} left behind")

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self._keep_logs()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _keep_logs(self) -> None:
        """With KVNET_DEVNET_LOGS=DIR, copy every process's node.log to DIR/<name>.log before the temp
        dir goes: a failed run (say one in ten) can be read afterwards instead of rerun until it fails."""
        dest = os.environ.get("KVNET_DEVNET_LOGS")
        if not dest:
            return
        Path(dest).mkdir(parents=True, exist_ok=True)
        for log in self.tmp.glob("*/node.log"):
            shutil.copyfile(log, Path(dest) / f"{log.parent.name}.log")
