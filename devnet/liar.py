"""A devnet-only liar: a kvnet p2p node, in its own process, whose offers lie about a document.

    python -m devnet.liar --dir D --bootstrap ADDR --manifest HEX --lie forged|foreign|phantom

It is not part of the product and the product daemon has no switch for it: lying lives here only.
It joins the devnet through a bootstrap peer, obtains the document's signed manifest from the
network (an offer of an honest provider: no piece is fetched), announces provider records for the
document's manifest id and every power-of-two chain key it would announce if it held every piece,
and then answers every `/kvnet/offer/1.0.0` request with its lie:

- `forged`: the document's manifest with one bit of its signature flipped: a manifest it does not
  hold (it cannot sign one for the publisher). A peer's `parse` rejects it (ManifestError) and the
  peer scores the liar down (`protocol`, kvnet.p2p.node.Node.offers).
- `foreign`: a manifest the liar signed itself, of the same model and length but over other tokens:
  it announces the document's prefix and cannot serve it. The offer parses but its chain does not
  hold the asked key, so the peer scores the liar down (`protocol`, Node._verified_offers).
- `phantom`: the document's real manifest with every piece claimed, while it holds none; a pieces
  request is answered `missing` for each piece (what an honest node that evicted the artifact says).
  kvnet does not score this lie today (an honest eviction looks the same): the fetch routes around it.

How it lies without patching kvnet: `LyingServer` subclasses kvnet.p2p.server.PieceServer and
overrides only `_offers_for` (the store lookup behind an offer answer); the node is built with no
bulk listener and its `server` replaced before it runs, as tests/p2p/test_lying_providers.py does.
Provider records are sent with kvnet.p2p.dht.provide, the same call an honest node makes. No kvnet
internals are patched. Prints one JSON ready line on stdout once its records are out; SIGTERM or
SIGINT stops it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devnet.scenarios import LIARS as LIES
from kvnet import canonical, chain, identity, logs
from kvnet.errors import KvnetError
from kvnet.manifest import SignedManifest
from kvnet.p2p import dht as kdht
from kvnet.p2p import wire
from kvnet.p2p.commands import run_trio
from kvnet.p2p.node import Node
from kvnet.p2p.server import PieceServer, StoreRunner
from kvnet.store import Store

FIND_ATTEMPTS = 20  # lookups of the document's manifest (it may not be announced yet), 0.5 s apart


class LiarError(KvnetError):
    """The liar could not start: the document's manifest was not found on the network."""


def forged_raw(sm: SignedManifest) -> bytes:
    """The manifest's canonical bytes with one bit of its signature flipped (fails verification)."""
    d = canonical.decode(sm.raw)
    sig = bytearray(d["sig"])
    sig[0] ^= 0x01
    return canonical.encode({**d, "sig": bytes(sig)})


def foreign_raw(sm: SignedManifest, key: Ed25519PrivateKey, seed: int = 7) -> bytes:
    """A manifest the liar signs itself: same model, length and layout as `sm`, chain over other tokens."""
    m = sm.manifest
    rng = random.Random(seed)
    tokens = [rng.randrange(256) for _ in range(m.n_tokens)]
    other = tuple(k.key for k in chain.chain_keys(m.model_id, tokens, m.block_size))
    fake = dataclasses.replace(m, chain=other, publisher=identity.public_bytes(key),
                               source={"title": "not the document"})
    return fake.sign(key).raw


class LyingServer(PieceServer):
    """Answers every offer request with one lie about the document (whatever key was asked)."""

    def __init__(self, runner: StoreRunner, offer_raw: bytes, n_pieces: int) -> None:
        super().__init__(runner)
        self.offer_raw, self.n_pieces = offer_raw, n_pieces
        self.offers_answered = 0

    def _offers_for(self, key: bytes) -> list[dict]:
        self.offers_answered += 1
        return [{"manifest": self.offer_raw, "have": wire.bitfield(set(range(self.n_pieces)), self.n_pieces)}]


async def _find(node: Node, mid: bytes) -> SignedManifest:
    for _ in range(FIND_ATTEMPTS):
        found = await node.find_manifest(mid)
        if found is not None:
            return found.signed
        await trio.sleep(0.5)
    raise LiarError(f"manifest {mid.hex()[:16]} not found on the network")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _run(node: Node, mid: bytes, lie: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)  # also while it is still looking
        await nursery.start(node.run)
        sm = await _find(node, mid)
        raw = {"forged": lambda: forged_raw(sm), "foreign": lambda: foreign_raw(sm, node.key),
               "phantom": lambda: sm.raw}[lie]()
        if lie == "phantom":  # its pieces server knows the manifest, and finds no piece: `missing`
            await node.runner.call(node.store.put_manifest, sm.raw)
        node.server.offer_raw, node.server.n_pieces = raw, len(sm.manifest.pieces)
        keys = kdht.announce_keys(sm.manifest, mid, set(range(len(sm.manifest.pieces))))
        for k in keys:
            await kdht.provide(node.dht, k, node.timeout)
        print(json.dumps({"ready": True, "liar": lie, "peer_id": node.peer_id.to_base58(),
                          "addrs": node.addrs, "announced": len(keys), "pid": os.getpid()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devnet.liar", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="its own folder (identity, store)")
    ap.add_argument("--bootstrap", required=True, help="a devnet node's multiaddr")
    ap.add_argument("--manifest", required=True, help="the document's manifest id (64 hex digits)")
    ap.add_argument("--lie", choices=LIES, required=True)
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    key = identity.generate(args.dir / "identity.key", force=True)
    store = Store(args.dir / "store")
    logs.setup("warning")
    node = Node(key, store, listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[args.bootstrap], bulk_listen=None)
    node.server = LyingServer(node.runner, b"", 0)
    logs.setup("warning")
    try:
        run_trio(_run, node, bytes.fromhex(args.manifest), args.lie)
    except KvnetError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
