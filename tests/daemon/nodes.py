"""Real kvnet-node processes for the daemon tests, through devnet's own handle (devnet.cluster): one
piece of code writes configs, starts nodes and waits for their `ready` line, for the devnet and the tests."""

from __future__ import annotations

from pathlib import Path

from devnet.cluster import ROOT, DevNode, env, node_cmd, start_node
from devnet.cluster import write_config as devnet_config

__all__ = ["ROOT", "NodeProc", "env", "node_cmd", "start", "write_config"]

NodeProc = DevNode


def write_config(dir_: Path, extra: str = "", log_format: str = "text", **agent: object) -> Path:
    """node.toml for a loopback test node on the tiny model (fp32: exactness is bitwise there)."""
    return devnet_config(dir_, "tiny", "fp32", agent=agent, extra=extra, log_format=log_format)


def start(config: Path) -> DevNode:
    """Start a node and wait for its JSON ready line on stdout (stderr goes to <dir>/node.log)."""
    return start_node(config)
