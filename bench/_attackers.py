"""Attacker and honest-client processes for bench/attacks.py, one group per process.

    python -m bench._attackers stall ADDR STREAMS IDENTITIES        # DHT streams that stall, kept stalled
    python -m bench._attackers lookups ADDR MANIFEST PROVIDER ROUNDS SPREAD_S  # honest DHT lookups via ADDR
    python -m bench._attackers liars ADDR MANIFEST COUNT              # Sybil liars ground close to MANIFEST
    python -m bench._attackers flood ADDR MANIFEST ATTACKERS STREAMS  # offer and pieces floods

Each prints one JSON line `{"ready": ...}` once its attack is in place (the long-running ones), keeps
it up until its stdin is closed, then prints one JSON line with what it saw and exits. The attacker
code is the in-process attack tests' own (tests/p2p/test_attack_*.py), imported, so the benchmark
and the tests attack in the same way; only the process around it is new. The churn group needs no
code here: tests/p2p/test_attack_churn.py is itself the churn attacker when run as a script.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet.p2p.host import make_host, peer_info, running

STALL_KINDS = ("idle", "dripping", "truncated", "not_reading")
LOOKUP_TIMEOUT_S = 30.0


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


async def _until_stdin_closes() -> None:
    """The orchestrator ends a long-running attack by closing our stdin."""
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


# -- (b) stalled DHT streams -----------------------------------------------------------------------


async def _stall_once(host, peer, kind: str) -> str:
    """Open one DHT stream that stalls in the way `kind` says; return how the victim ended it."""
    from kvnet.p2p import dht as kdht
    from kvnet.p2p import dht_limits
    from tests.p2p.test_attack_dht import _ended, _find_node

    stream = await host.new_stream(peer, [kdht.DHT_PROTOCOL])
    request = _find_node(peer.to_bytes())
    if kind == "truncated":  # a length prefix of 100 bytes, then 10 of them
        await stream.write(b"\x64" + b"x" * 10)
    elif kind == "not_reading":  # pipelines requests and never reads an answer
        await stream.write(request * 50)
    elif kind == "dripping":  # one byte a second
        async with trio.open_nursery() as n:
            async def drip() -> None:
                for byte in request * 4:
                    try:
                        await stream.write(bytes([byte]))
                    except Exception:  # noqa: BLE001 - reset by the victim's deadline: the point
                        return
                    await trio.sleep(1.0)

            n.start_soon(drip)
            end = await _ended(stream)
            n.cancel_scope.cancel()
            return end
    if kind == "not_reading":  # past the victim's stream deadline, then drain what it sent
        await trio.sleep(dht_limits.DHT_STREAM_TIMEOUT_S + 1)
    return await _ended(stream)


async def stall(addr: str, streams: int, identities: int) -> dict:
    """`streams` DHT streams from `identities` peers (STALL_KINDS in turn), each re-opened as soon as
    the victim ends it, so that many are stalled at every moment until stdin closes."""
    info = peer_info(addr)
    ends: dict[str, dict[str, int]] = {k: {} for k in STALL_KINDS}
    errors: dict[str, int] = {}
    async with trio.open_nursery() as n:
        hosts = []
        for _ in range(identities):
            host = make_host(Ed25519PrivateKey.generate())
            ready = trio.Event()

            async def run(host=host, ready=ready) -> None:
                async with running(host, ["/ip4/127.0.0.1/tcp/0"]):
                    await host.connect(info)
                    ready.set()
                    await trio.sleep_forever()

            n.start_soon(run)
            await ready.wait()
            hosts.append(host)

        async def keep_stalled(host, kind: str) -> None:
            while True:
                try:
                    end = await _stall_once(host, info.peer_id, kind)
                    ends[kind][end] = ends[kind].get(end, 0) + 1
                except Exception as exc:  # noqa: BLE001 - an open refused by the victim: try again
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await trio.sleep(0.5)

        for i in range(streams):
            n.start_soon(keep_stalled, hosts[i % identities], STALL_KINDS[i % len(STALL_KINDS)])
        await trio.sleep(1.0)
        _emit({"ready": True, "streams": streams, "identities": identities})
        t0 = time.monotonic()
        await _until_stdin_closes()
        held = time.monotonic() - t0
        n.cancel_scope.cancel()
    return {"streams": streams, "identities": identities, "held_s": round(held, 1), "ended_by_victim": ends,
            "open_errors": errors}


# -- honest DHT lookups (run while the stalls are held) --------------------------------------------


async def lookups(addr: str, manifest_hex: str, provider: str, rounds: int, spread_s: float) -> dict:
    """An honest kvnet node that knows only the victim: `rounds` times, spread over `spread_s` seconds
    (longer than the victim's DHT stream deadline, so some run against re-opened stalls), a
    GET_PROVIDERS for the manifest sent to the victim itself (its DHT handler is what the stalls
    attack), then a full find_manifest."""
    from kvnet.p2p import compat
    from tests.p2p.conftest import make_node

    mid = bytes.fromhex(manifest_hex)
    direct, full, failures = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        client = make_node(Path(tmp), "C", [addr], timeout=5.0)
        async with trio.open_nursery() as n:
            await n.start(functools.partial(client.run, announce=False))
            victim = peer_info(addr).peer_id
            for i in range(rounds):
                try:
                    t0 = time.perf_counter()
                    with trio.fail_after(LOOKUP_TIMEOUT_S):
                        infos, _ = await compat.providers_and_closers_from_peer(client.dht, victim, mid)
                    if provider not in [x.peer_id.to_base58() for x in infos]:
                        raise LookupError("the victim did not name the provider")
                    direct.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    with trio.fail_after(LOOKUP_TIMEOUT_S):
                        found = await client.find_manifest(mid)
                    if found is None:
                        raise LookupError("nothing found on the network")
                    full.append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - a failed lookup is what is counted
                    failures.append(f"round {i}: {type(exc).__name__}: {exc}"[:200])
                await trio.sleep(spread_s / rounds)
            n.cancel_scope.cancel()
    return {"rounds": rounds, "direct_ok": len(direct), "find_ok": len(full), "failures": failures,
            "direct_s": [round(x, 3) for x in direct], "find_s": [round(x, 3) for x in full]}


# -- (c) lying providers ---------------------------------------------------------------------------


async def liars(addr: str, manifest_hex: str, count: int) -> dict:
    """`count` Sybil liars (tests/p2p/test_attack_lookup.py's), identities ground into the near half of
    the key space around the manifest id (the victim and the honest provider are in the far half),
    joined through the victim and announcing the manifest id; up until stdin closes."""
    from tests.artifacts import fake_artifact
    from tests.p2p.test_attack_lookup import MODES, _ground_keys, _liar

    mid = bytes.fromhex(manifest_hex)
    wrong_raw = fake_artifact(97, 1)[0].raw
    async with trio.open_nursery() as n:
        keys = _ground_keys(mid, count, 1 << 255)
        async with trio.open_nursery() as start:
            for i, priv in enumerate(keys):
                start.start_soon(_liar, n, priv, MODES[i % len(MODES)], addr, [mid], wrong_raw)
        _emit({"ready": True, "liars": count})
        t0 = time.monotonic()
        await _until_stdin_closes()
        held = time.monotonic() - t0
        n.cancel_scope.cancel()
    return {"liars": count, "modes": {m: sum(MODES[i % len(MODES)] == m for i in range(count)) for m in MODES},
            "held_s": round(held, 1)}


# -- (d) offer and pieces floods -------------------------------------------------------------------


async def flood(addr: str, manifest_hex: str, attackers: int, streams: int, offers: int = 100) -> dict:
    """Each of `attackers` raw hosts (tests/p2p/test_attack_serving.py's) opens `streams` pieces streams
    at once, each asking for every piece, sends one request of 16 overlapping whole-artifact ranges,
    and `offers` offer requests back to back. Counts bytes drawn and how each stream ended."""
    from kvnet.p2p import wire
    from kvnet.p2p.server import OFFER_PROTOCOL, PIECES_PROTOCOL
    from tests.p2p.test_attack_serving import _attacker, _read_all

    mid = bytes.fromhex(manifest_hex)
    victim = SimpleNamespace(addrs=[addr])
    peer = peer_info(addr).peer_id
    drawn, ends, offer_answers = 0, {}, 0
    t0 = time.perf_counter()

    def count(end: str) -> None:
        ends[end] = ends.get(end, 0) + 1

    async def pieces(host, ranges: list) -> None:
        nonlocal drawn
        try:
            stream = await host.new_stream(peer, [PIECES_PROTOCOL])
            await wire.write_frame(stream, {"v": 1, "manifest": mid, "ranges": ranges, "receipt": None})
            got, end = await _read_all(stream)
            drawn += got
            count(end)
            await stream.close()
        except Exception as exc:  # noqa: BLE001 - a reset stream is one way the victim refuses
            count(type(exc).__name__)

    async def offer_flood(host) -> None:
        nonlocal offer_answers
        for _ in range(offers):
            try:
                stream = await host.new_stream(peer, [OFFER_PROTOCOL])
                await wire.write_frame(stream, {"v": 1, "key": mid, "receipt": None})
                with trio.fail_after(10):
                    if "offers" in await wire.read_frame(stream, wire.MAX_RESPONSE):
                        offer_answers += 1
                await stream.close()
            except Exception as exc:  # noqa: BLE001
                count(f"offer {type(exc).__name__}")

    async with trio.open_nursery() as n:
        hosts = [await _attacker(n, victim) for _ in range(attackers)]
        async with trio.open_nursery() as attack:
            for host in hosts:
                attack.start_soon(pieces, host, [[0, 64]] * 16)
                for _ in range(streams):
                    attack.start_soon(pieces, host, [[0, 64]])
                attack.start_soon(offer_flood, host)
        n.cancel_scope.cancel()
    asked = attackers * (streams + 16)
    return {"attackers": attackers, "pieces_streams": attackers * (streams + 1), "offers": attackers * offers,
            "offers_answered": offer_answers, "asked_artifacts": asked, "drawn_mib": round(drawn / 2**20, 2),
            "ends": ends, "seconds": round(time.perf_counter() - t0, 2)}


GROUPS = {"stall": (stall, (str, int, int)), "lookups": (lookups, (str, str, str, int, float)),
          "liars": (liars, (str, str, int)), "flood": (flood, (str, str, int, int))}


def main(argv: list[str]) -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    fn, types = GROUPS[argv[0]]
    args = [t(a) for t, a in zip(types, argv[1:], strict=True)]
    _emit(trio.run(fn, *args))


if __name__ == "__main__":
    main(sys.argv[1:])
