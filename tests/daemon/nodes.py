"""Real kvnet-node processes for the daemon tests: a config in a temp dir, start, wait for `ready`, stop."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[2]
START_TIMEOUT_S = 90.0


def write_config(dir_: Path, extra: str = "", log_format: str = "text", **agent: object) -> Path:
    """node.toml for a loopback test node on the tiny model (fp32: exactness is bitwise there)."""
    dir_.mkdir(parents=True, exist_ok=True)
    agent_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in agent.items())
    text = (f'data_dir = "{dir_ / "data"}"\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nmetrics = "127.0.0.1:0"\n{extra}\n'
            f'[model]\nref = "tiny"\ndtype = "fp32"\n[log]\nlevel = "info"\nformat = "{log_format}"\n'
            f'[agent]\n{agent_lines}\n')
    path = dir_ / "node.toml"
    path.write_text(text)
    return path


def node_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "kvnet.daemon.main", "--config", str(config)]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@dataclass
class NodeProc:
    proc: subprocess.Popen
    ready: dict
    config: Path
    tcp_port: int = 0

    @property
    def socket(self) -> str:
        return self.ready["socket"]

    @property
    def addr(self) -> str:
        return self.ready["addrs"][0]

    def http(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://node", timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start(config: Path) -> NodeProc:
    """Start a node and wait for its JSON ready line on stdout (stderr goes to <dir>/node.log)."""
    log = open(config.parent / "node.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(node_cmd(config), stdout=subprocess.PIPE, stderr=log, env=env(), cwd=ROOT)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"kvnet-node did not get ready: {(config.parent / 'node.log').read_text()[-2000:]}")
        r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if r:
            buf += os.read(proc.stdout.fileno(), 4096)
    return NodeProc(proc, json.loads(buf.split(b"\n", 1)[0]), config)
