"""Test and benchmark artifacts that need no model: signed manifests over seeded bytes, provider
homes holding them, and `kvnet serve` processes serving them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import identity
from kvnet.hashing import b3
from kvnet.manifest import Manifest, Terms
from kvnet.pieces import ArtifactError, split_pieces
from kvnet.store import Store

ROOT = Path(__file__).resolve().parents[1]

_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def fake_artifact(seed: int, mb: int, piece_size: int = 1 << 20, kv_shape: tuple = (2, 2, 16)):
    """A signed manifest over about `mb` MiB of seeded bytes, shaped like bf16 KV of `kv_shape`
    (default: tiny's, 256 B/token). Valid in every way a peer can check, without running a model."""
    per_token = kv_shape[0] * 2 * kv_shape[1] * kv_shape[2] * 2
    n_tokens = (mb << 20) // per_token
    data = random.Random(seed).randbytes(n_tokens * per_token)
    m = Manifest(
        model_id=bytes([seed % 256]) * 32, profile={"device": "test"}, dtype="bf16", kv_shape=kv_shape,
        n_tokens=n_tokens, block_size=256, chain=tuple((bytes([seed % 256]) + i.to_bytes(3, "big")) * 8
                                                      for i in range(-(-n_tokens // 256))),  # distinct keys
        piece_size=piece_size, pieces=tuple(b3(p) for p in split_pieces(memoryview(data),
                                                                                       piece_size)),
        total_bytes=len(data), publisher=identity.public_bytes(_KEY), terms=Terms(), created=1, expires=0,
        source={"title": f"fake {seed}"},
    )
    return m.sign(_KEY), [bytes(p) for p in split_pieces(memoryview(data), piece_size)]


def corrupt_piece(store: Store, mid: bytes, index: int, at: int = 0) -> None:
    """Flip one byte of a stored piece on disk, behind the store's back (a rotting disk), found
    through `Store.piece_span` so that no test hard-codes the store's layout."""
    path, offset, _ = store.piece_span(mid, index)
    with open(path, "r+b") as f:
        f.seek(offset + at)
        b = f.read(1)
        f.seek(offset + at)
        f.write(bytes([b[0] ^ 0xFF]))


def lose_piece(store: Store, mid: bytes, index: int) -> None:
    """Make the store lose one piece the way a real store does: its bytes rot on disk and a verifying
    read finds it corrupt and drops it from the index."""
    corrupt_piece(store, mid, index)
    try:
        store.read_piece(mid, index, verify=True)
    except ArtifactError:
        return
    raise AssertionError(f"piece {index} was corrupted on disk, yet it read back whole")


def provider_home(tmp: Path, name: str, sm, pieces) -> Path:
    """A node directory with an identity key and a store holding the whole artifact."""
    home = tmp / name
    identity.generate(home / "identity.key")
    with Store(home / "store") as store:
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, list(enumerate(pieces)))
    return home


def serve_process(home: Path, bootstrap: str | None = None,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `kvnet serve` for `home`; return the process and the address it listens on.
    `env` adds environment variables (e.g. KVNET_LOG_LEVEL)."""
    args = [sys.executable, "-m", "kvnet.cli", "serve", "--home", str(home)]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline().split()
    if not first or first[0] != "listening":
        raise RuntimeError(f"kvnet serve did not start: {proc.stderr.read()}")
    return proc, first[1]
