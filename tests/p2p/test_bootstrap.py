"""The bootstrap contract the CLI relies on: a malformed address is one `BootstrapError` before anything
starts; an unreachable peer is reported in the fetch outcome, never raised; `run_trio` unwraps groups."""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import identity
from kvnet.errors import BootstrapError, InputError
from kvnet.p2p import commands
from kvnet.p2p.host import peer_id_of
from tests.p2p.conftest import make_node


def _dead_addr() -> str:
    """A well-formed address where nobody listens (a port just released) and a peer id nobody has."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pid = peer_id_of(identity.public_bytes(Ed25519PrivateKey.generate())).to_base58()
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}"


@pytest.mark.parametrize("bad", ["garbage", "/ip4/127.0.0.1/tcp/4001", "/ip4/1.2.3.4/tcp/1/p2p/notanid",
                                 "/ip4/127.0.0.1/udp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"])
def test_a_malformed_bootstrap_address_is_one_clear_error(tmp_path, bad):
    identity.generate(tmp_path / "identity.key")
    good = _dead_addr()
    with pytest.raises(BootstrapError) as err:
        commands.open_node(tmp_path, None, [good, bad])
    assert repr(bad) in str(err.value) and good not in str(err.value)  # names the bad one only
    assert "\n" not in str(err.value)


def test_addresses_are_checked_before_the_identity_is_loaded(tmp_path):
    with pytest.raises(BootstrapError):
        commands.open_node(tmp_path / "no-such-home", None, ["garbage"])


def test_an_unreachable_bootstrap_peer_is_a_fetch_outcome_not_an_exception(tmp_path):
    identity.generate(tmp_path / "identity.key")
    dead = _dead_addr()
    node = commands.open_node(tmp_path, None, [dead])
    outcome = commands.run_trio(partial(commands.fetch, node, manifest_id=bytes(32)))
    assert outcome.found is None and outcome.result is None
    assert outcome.error.startswith("no bootstrap peer reachable (tried 1: ")
    assert dead in outcome.error and "\n" not in outcome.error
    assert node.bootstrap_reached == [] and list(node.bootstrap_failed) == [dead]


def test_without_bootstrap_no_peer_is_asked(tmp_path):
    identity.generate(tmp_path / "identity.key")
    node = commands.open_node(tmp_path, None, [])
    outcome = commands.run_trio(partial(commands.fetch, node, manifest_id=bytes(32)))
    assert outcome.error == "no peer was asked (no --bootstrap given)"


@pytest.mark.trio
async def test_a_serving_node_starts_although_its_bootstrap_peer_is_gone(tmp_path):
    dead = _dead_addr()
    async with trio.open_nursery() as n:
        node = await n.start(make_node(tmp_path, "S", [dead]).run)
        assert node.bootstrap_failed.keys() == {dead} and node.addrs
        n.cancel_scope.cancel()


def test_run_trio_raises_the_kvnet_error_inside_nested_groups():
    async def nested() -> None:
        async def fail() -> None:
            raise InputError("the one clear line")

        async with trio.open_nursery() as outer:
            async def inner() -> None:
                async with trio.open_nursery() as n:
                    n.start_soon(fail)

            outer.start_soon(inner)

    with pytest.raises(InputError, match="the one clear line"):
        commands.run_trio(nested)


def test_run_trio_unwraps_a_malformed_bootstrap_met_inside_a_running_node(tmp_path):
    node = make_node(tmp_path, "N", ["garbage"])  # bypasses open_node's check: Node.run checks again

    async def start() -> None:
        async with trio.open_nursery() as n:
            await n.start(node.run)

    with pytest.raises(BootstrapError, match="garbage"):
        commands.run_trio(start)


def test_run_trio_leaves_other_groups_alone():
    async def bug() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(partial(_raise, RuntimeError("a bug")))

    with pytest.raises(BaseExceptionGroup):
        commands.run_trio(bug)


async def _raise(exc: BaseException) -> None:
    raise exc
