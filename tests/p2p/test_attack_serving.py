"""A node must not be an amplifier, and must hold to the spec's request rules (issue 7).

Attackers are raw py-libp2p hosts (no kvnet node behind them) that open `pieces` and `offer` streams
themselves. Each test also runs an honest fetch from the attacked node, during or right after the
attack, and checks that it succeeds.
"""

from __future__ import annotations

import struct

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical
from kvnet.p2p import wire
from kvnet.p2p.host import DEFAULT_LISTEN, make_host, peer_info, running
from kvnet.p2p.server import (
    MAX_PIECES_STREAMS_PER_PEER,
    OFFER_PROTOCOL,
    PIECES_PROTOCOL,
    SERVE_BYTES_PER_PEER,
    SERVE_WINDOW_S,
    ServeLimits,
)
from tests.artifacts import ROOT, fake_artifact
from tests.p2p.conftest import make_node

PIECE = 64 * 1024
BUDGET = 8 << 20  # the attacked node's per-peer budget in these tests: 8 MiB per minute


async def _read_all(stream) -> tuple[int, str]:
    """Read a pieces answer to its end: (piece bytes received, how it ended: 'done' or the error code)."""
    got = 0
    with trio.fail_after(20):
        while True:
            head = await wire.read_frame(stream, wire.MAX_RESPONSE)
            if head.get("done") is True:
                return got, "done"
            if "err" in head and "i" not in head:
                return got, head["err"]
            if "n" in head:
                await wire.read_exact(stream, head["n"])
                got += head["n"]


async def _attacker(nursery: trio.Nursery, victim) -> object:
    """A bare libp2p host connected to `victim` (kvnet's patched yamux, nothing else of kvnet)."""
    host = make_host(Ed25519PrivateKey.generate())
    ready = trio.Event()

    async def run() -> None:
        async with running(host, [DEFAULT_LISTEN]):
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    await host.connect(peer_info(victim.addrs[0]))
    return host


async def _victim_and_client(n: trio.Nursery, tmp_path, limits: ServeLimits | None = None):
    """V holds a 4 MiB artifact (64 pieces of 64 KiB); C is an honest kvnet node that knows V."""
    sm, pieces = fake_artifact(91, 4, piece_size=PIECE)
    victim = make_node(tmp_path, "V", timeout=3.0, serve_limits=limits)
    victim.store.put_manifest(sm.raw)
    victim.store.put_pieces(sm.id, list(enumerate(pieces)))
    client = make_node(tmp_path, "C", timeout=3.0)
    v = await n.start(victim.run)
    client.bootstrap = [v.addrs[0]]
    await n.start(client.run)
    return v, client, sm


async def _honest_fetch(client, sm) -> None:
    found = await client.find_manifest(sm.id)
    assert found is not None
    result = await client.fetch(found)
    assert result.fetched + result.already_had == len(sm.manifest.pieces)
    assert client.store.missing_pieces(sm.id) == []


def test_defaults_are_the_documented_values():
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    security = (ROOT / "docs" / "security.md").read_text()
    artifact = (ROOT / "docs" / "artifact.md").read_text()
    assert f"(`MAX_PIECES_STREAMS_PER_PEER`) | {MAX_PIECES_STREAMS_PER_PEER}; the next one" in protocol
    assert f"({SERVE_BYTES_PER_PEER:,} bytes) per {SERVE_WINDOW_S:g} s" in protocol
    assert f"| `pieces` streams open at once per peer | {MAX_PIECES_STREAMS_PER_PEER} |" in security
    assert SERVE_BYTES_PER_PEER == 1 << 30 and "| 1 GiB per 60 s" in security
    assert f"nested more than {canonical.MAX_DEPTH} deep" in artifact
    assert f"| nesting of arrays and maps in any decoded frame | {canonical.MAX_DEPTH} |" in security
    assert {"busy", "rate_limited"} <= wire.ERROR_CODES and {"busy", "rate_limited"} == wire.LOAD_CODES


@pytest.mark.trio
async def test_twenty_streams_from_one_peer_draw_at_most_its_budget(tmp_path):
    """20 streams, each asking for all 64 pieces (4 MiB): 80 MiB unbounded. With an 8 MiB/min budget
    the attacker gets at most 8 MiB (plus what refills while the test runs); every other stream is
    refused `rate_limited` or `busy`; the attacker is scored down; an honest fetch alongside works."""
    async with trio.open_nursery() as n:
        v, client, sm = await _victim_and_client(n, tmp_path, ServeLimits(bytes_per_window=BUDGET))
        evil = await _attacker(n, v)
        t0 = trio.current_time()
        ends: list[tuple[int, str]] = []

        async def one() -> None:
            stream = await evil.new_stream(v.peer_id, [PIECES_PROTOCOL])
            await wire.write_frame(stream, {"v": 1, "manifest": sm.id, "ranges": [[0, 64]], "receipt": None})
            ends.append(await _read_all(stream))
            await stream.close()

        async with trio.open_nursery() as attack:
            for _ in range(20):
                attack.start_soon(one)
            await _honest_fetch(client, sm)  # during the attack
        elapsed = trio.current_time() - t0
        drawn = sum(got for got, _ in ends)
        codes = [end for _, end in ends]
        print(f"\nattacker: 20 streams drew {drawn / 2**20:.2f} MiB of {20 * 4} MiB asked in {elapsed:.1f} s; "
              f"ends {sorted(set(codes))}: {[codes.count(c) for c in sorted(set(codes))]}; "
              f"victim refused {v.server.refused}")
        assert len(ends) == 20 and set(codes) <= {"done", "rate_limited", "busy"}
        assert "rate_limited" in codes
        assert drawn <= BUDGET * (1 + elapsed / 60) + PIECE
        evil_id = evil.get_id().to_base58()
        assert v.scores.get(evil_id) < 0 and v.scores.get(client.peer_id.to_base58()) == 0
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_streams_over_the_per_peer_limit_are_refused_busy(tmp_path):
    """A peer holding 8 pieces streams open (idle, no request) gets `busy` on the 9th at once, while
    an honest peer is served in full; the idle ones still end with `timeout` at the server's deadline."""
    async with trio.open_nursery() as n:
        v, client, sm = await _victim_and_client(n, tmp_path)
        evil = await _attacker(n, v)
        idle = [await evil.new_stream(v.peer_id, [PIECES_PROTOCOL]) for _ in range(MAX_PIECES_STREAMS_PER_PEER)]
        await trio.sleep(0.2)  # the server has accepted them all
        extra = await evil.new_stream(v.peer_id, [PIECES_PROTOCOL])
        with trio.fail_after(2):  # answered at once, not at the request timeout
            head = await wire.read_frame(extra, wire.MAX_RESPONSE)
        assert head["err"] == "busy"
        await _honest_fetch(client, sm)  # an honest peer is unaffected
        assert v.server.refused.get("busy") == 1 and v.scores.get(evil.get_id().to_base58()) < 0
        for s in idle:
            with trio.fail_after(6):
                assert (await wire.read_frame(s, wire.MAX_RESPONSE))["err"] == "timeout"
        n.cancel_scope.cancel()


def _nested(depth: int) -> bytes:
    """A canonical pieces request nested `depth` deep in all: the map, then `ranges` as depth - 1
    arrays one inside the other (the innermost empty)."""
    inner = b"\x91" * (depth - 2) + b"\x90"
    body = {"manifest": b"\x00" * 32, "receipt": None, "v": 1}
    enc = canonical.encode({**body, "ranges": []})
    # splice the deep array in place of the empty `ranges` array (0x90)
    at = enc.index(b"\xa6ranges") + len(b"\xa6ranges")
    assert enc[at : at + 1] == b"\x90"
    payload = enc[:at] + inner + enc[at + 1 :]
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.trio
async def test_request_rules_unknown_fields_and_deep_nesting_are_malformed(tmp_path):
    async with trio.open_nursery() as n:
        v, client, sm = await _victim_and_client(n, tmp_path)
        evil = await _attacker(n, v)

        async def answer(protocol: str, payload: bytes) -> dict:
            stream = await evil.new_stream(v.peer_id, [protocol])
            await stream.write(payload)
            with trio.fail_after(5):
                msg = await wire.read_frame(stream, wire.MAX_RESPONSE)
            await stream.reset()
            return msg

        pad = 16 * 1024
        while len(big := wire.frame({"v": 1, "manifest": sm.id, "ranges": [[0, 1]], "receipt": None,
                                     "pad": bytes(pad)})) - 4 > 16 * 1024:
            pad -= 1
        cases = {
            "offer with an unknown field": (OFFER_PROTOCOL, wire.frame({"v": 1, "key": sm.id, "receipt": None,
                                                                        "x": 1})),
            "pieces with an unknown field": (PIECES_PROTOCOL, wire.frame({"v": 1, "manifest": sm.id,
                                                                          "ranges": [[0, 1]], "extra": b""})),
            "a 16 KiB request padded by an unknown field": (PIECES_PROTOCOL, big),
            "pieces nested 500 deep": (PIECES_PROTOCOL, _nested(500)),
            "offer nested 500 deep": (OFFER_PROTOCOL, _nested(500)),
            "pieces nested 33 deep": (PIECES_PROTOCOL, _nested(33)),
        }
        for name, (protocol, payload) in cases.items():
            msg = await answer(protocol, payload)
            assert msg.get("err") == "malformed", (name, msg)
        # 32 deep decodes (the limit), and is then refused for its content, not its depth
        assert (await answer(PIECES_PROTOCOL, _nested(32)))["err"] == "bad_range"
        # the node answers honest requests right after
        assert (await answer(OFFER_PROTOCOL, wire.frame({"v": 1, "key": sm.id, "receipt": None})))["offers"]
        await _honest_fetch(client, sm)
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_client_treats_rate_limited_as_load_not_a_lie(tmp_path):
    """An honest client over an (artificially small) budget gets `rate_limited` partway: it keeps the
    verified pieces it got, drops that provider for this fetch at the small `refused` cost (-1, not
    the -5 of a protocol violation), and the fetch reports what it could not get. Over `pieces`
    streams (8-piece requests): (a bulk grant of more than the budget gets the part that fits:
    tests/p2p/test_paid_grants.py)."""
    from kvnet.p2p.fetcher import FetchError
    from kvnet.p2p.scores import PENALTY

    async with trio.open_nursery() as n:
        v, client, sm = await _victim_and_client(n, tmp_path, ServeLimits(bytes_per_window=16 * PIECE))
        found = await client.find_manifest(sm.id)
        with pytest.raises(FetchError, match="could not be fetched"):
            await client.fetch(found, bulk=None)
        got = len(sm.manifest.pieces) - len(client.store.missing_pieces(sm.id))
        assert 0 < got <= 16 + 1  # the budget (plus what refilled meanwhile)
        assert client.scores.get(v.peer_id.to_base58()) == PENALTY["refused"] == -1.0
        assert v.server.refused.get("rate_limited", 0) >= 1
        n.cancel_scope.cancel()
