"""N real kvnet-node processes on loopback, each with its own temp dir, identity and node.toml.

Node 0 starts first; every other node bootstraps through it. `Cluster` is a context manager whose exit
stops every node (SIGTERM, then SIGKILL after a grace) and removes the temp dir, also when the
scenario failed or the user pressed Ctrl-C, and checks that no node process or socket file is left.
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
    name: str
    dir: Path
    proc: subprocess.Popen
    ready: dict

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


def _config(dir_: Path, model: str, dtype: str, bootstrap: list[str], agent: dict, fee_per_mib: int = 0) -> Path:
    lines = [f'data_dir = "{dir_ / "data"}"', 'listen = ["/ip4/127.0.0.1/tcp/0"]', 'metrics = "127.0.0.1:0"',
             f"bootstrap = {json.dumps(bootstrap)}", "[model]", f'ref = "{model}"', f'dtype = "{dtype}"',
             "[log]", 'level = "info"', "[prices]", f"host_fee_per_mib = {fee_per_mib}",
             "[agent]", *(f"{k} = {json.dumps(v)}" for k, v in agent.items())]
    path = dir_ / "node.toml"
    dir_.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class Cluster:
    def __init__(self, n: int, model: str = "tiny", dtype: str = "fp32", agent: dict | None = None,
                 fee_per_mib: int = DEFAULT_FEE_PER_MIB) -> None:
        if n < 1:
            raise DevnetError("a devnet needs at least one node")
        self.n, self.model, self.dtype, self.agent = n, model, dtype, agent or {}
        self.fee_per_mib = fee_per_mib  # every node's hosting fee (micro-units per MiB, node.toml [prices])
        self.tmp = Path(tempfile.mkdtemp(prefix="kvnet-devnet-"))
        self.nodes: list[DevNode] = []
        self.leftovers: list[str] = []
        self.killed: set[str] = set()

    def _start(self, name: str, bootstrap: list[str]) -> DevNode:
        dir_ = self.tmp / name
        cfg = _config(dir_, self.model, self.dtype, bootstrap, self.agent, self.fee_per_mib)
        log = open(dir_ / "node.log", "ab")  # noqa: SIM115 - the child holds it
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "kvnet.daemon.main", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT, start_new_session=True)
        log.close()
        node = DevNode(name, dir_, proc, {})
        self.nodes.append(node)  # stopped on exit even if it never gets ready
        deadline, buf = time.monotonic() + START_TIMEOUT_S, b""
        while b"\n" not in buf:
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = (dir_ / "node.log").read_text()[-1500:]
                raise DevnetError(f"node {name} did not get ready:\n{tail}")
            r, _, _ = select.select([proc.stdout], [], [], 1.0)
            if r:
                buf += os.read(proc.stdout.fileno(), 4096)
        node.ready = json.loads(buf.split(b"\n", 1)[0])
        return node

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
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in self.nodes:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.leftovers.append(f"{node.name}: did not stop on SIGTERM (killed)")
                node.proc.kill()
                node.proc.wait(10)
            if node.ready and node.name not in self.killed and os.path.exists(node.socket):
                self.leftovers.append(f"{node.name}: socket file {node.socket} left behind")

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
