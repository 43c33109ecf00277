"""One shared kvnet-node process (tiny model, fp32) for the agent-socket tests of the session.

It also listens on a loopback TCP port with a bearer token, so the TCP path is tested on the same node."""

from __future__ import annotations

import socket

import pytest

from tests.daemon.nodes import start, write_config

TOKEN = "test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def node(tmp_path_factory):
    port = _free_port()
    n = start(write_config(tmp_path_factory.mktemp("node"), max_body_bytes=65536, max_tokens=64, tcp_port=port,
                           token=TOKEN))
    n.tcp_port = port
    yield n
    n.stop()
