"""Shared fixtures. Synthetic models are built into a per-session cache dir so tests are hermetic;
subprocesses inherit it through the environment."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

if "KVNET_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kvnet-test-cache-")
    os.environ["KVNET_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from kvnet.engine import Engine  # noqa: E402
from kvnet.store import Store  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bf16() -> Engine:
    return Engine("tiny", "bf16")


@pytest.fixture(scope="session")
def tiny_fp32() -> Engine:
    return Engine("tiny", "fp32")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "store") as s:
        yield s


def random_tokens(n: int, seed: int, vocab: int = 261) -> list[int]:
    """Random ids over the byte tokenizer's whole vocabulary, pad and chat specials included."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]
