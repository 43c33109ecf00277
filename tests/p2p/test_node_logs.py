"""Departed peers are routine: a node reports them on its own loggers below WARNING, and keeps
libp2p (which logs every failed dial at ERROR) quiet. Real nodes; the logs are captured, not mocked."""

from __future__ import annotations

import logging

import pytest
import trio

from tests.p2p.conftest import make_node
from tests.p2p.test_bootstrap import _dead_addr


def _loud(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.startswith("kvnet") and r.levelno >= logging.WARNING]


def test_a_node_keeps_libp2p_quiet(tmp_path):
    make_node(tmp_path, "N")
    assert logging.getLogger("libp2p").getEffectiveLevel() > logging.ERROR


@pytest.mark.trio
async def test_departed_peers_are_logged_below_warning(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="kvnet")
    dead = _dead_addr()
    async with trio.open_nursery() as n:
        node = await n.start(make_node(tmp_path, "N", [dead]).run)
        async with trio.open_nursery() as gone:
            peer = await gone.start(make_node(tmp_path, "D").run)
            peer_id = peer.peer_id
            gone.cancel_scope.cancel()
        assert await node.offers(peer_id, bytes(32)) == []  # a peer that left offers nothing
        n.cancel_scope.cancel()
    assert _loud(caplog) == []
    quiet = [r for r in caplog.records if r.name.startswith("kvnet") and r.levelno < logging.WARNING]
    assert any(dead in r.getMessage() for r in quiet)  # the dead bootstrap peer was reported (INFO)
    assert any(peer_id.to_base58() in r.getMessage() for r in quiet)  # and the departed peer (DEBUG)
