"""One shared kvnet-node process (tiny model, fp32) for the agent-socket tests of a module."""

from __future__ import annotations

import pytest

from tests.daemon.nodes import start, write_config


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = start(write_config(tmp_path_factory.mktemp("node"), max_body_bytes=65536, max_tokens=64))
    yield n
    n.stop()
