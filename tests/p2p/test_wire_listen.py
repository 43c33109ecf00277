"""A node told to listen on a port another node already listens on refuses to start (ListenError),
instead of sharing the port through SO_REUSEPORT and silently splitting incoming connections."""

from __future__ import annotations

import socket

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet.errors import KvnetError, ListenError
from kvnet.p2p.host import make_host, running
from tests.p2p.conftest import make_node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.trio
async def test_second_host_on_the_same_port_raises_listen_error():
    addr = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    first, second = make_host(Ed25519PrivateKey.generate()), make_host(Ed25519PrivateKey.generate())
    async with running(first, [addr]):
        assert [str(a).split("/p2p/")[0] for a in first.get_addrs()] == [addr]
        with pytest.raises(ListenError) as err:
            async with running(second, [addr]):
                pytest.fail("the second host listens on a port the first one holds")
        assert addr in str(err.value) and "in use" in str(err.value)
        assert isinstance(err.value, KvnetError)
    # once the first host is gone the port is usable again (SO_REUSEADDR is kept)
    third = make_host(Ed25519PrivateKey.generate())
    async with running(third, [addr]):
        assert third.get_addrs()


@pytest.mark.trio
async def test_node_run_on_a_taken_port_fails_plainly(tmp_path):
    """Node.run raises the ListenError itself (not wrapped in an exception group) before serving."""
    port = _free_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}"
    a = make_node(tmp_path, "A", listen=[addr])
    b = make_node(tmp_path, "B", listen=[addr])
    async with trio.open_nursery() as n:
        await n.start(a.run)
        with pytest.raises(ListenError, match=f"tcp/{port}"):
            await b.run()
        n.cancel_scope.cancel()
