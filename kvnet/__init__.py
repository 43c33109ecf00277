"""kvnet: publish a document's KV cache once, reuse it token-exactly everywhere.

The public surface is `__all__` below; each name is imported on first use, so `import kvnet` stays
cheap and torch is loaded only by what needs a model (Engine, publish_tokens, answer). The module
map and its layering are in docs/architecture.md (checked by tests/test_layers.py):

  errors              -> KvnetError, the root of every deliberate error
  canonical, hashing  -> encodings and BLAKE3 helpers shared by every format
  tokenizer, models   -> reading text, tokenizers, model refs and model ids
  engine              -> prefill / continue-from-KV on a Qwen3 model
  chain               -> chain keys: the address of a KV prefix
  identity, manifest  -> Ed25519 keys and the signed artifact manifest
  artifact, pieces    -> KV <-> block-major bytes <-> verified pieces (pieces: the torch-free part)
  store               -> crash-safe local store (a data file per artifact) with an SQLite index
  publish, reuse      -> the offline workflows the CLI drives
  p2p                 -> libp2p host, DHT, offer/pieces protocols, fetcher, node
  logs, cli           -> logging setup and the `kvnet` command
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "KvnetError": "kvnet.errors",
    "InputError": "kvnet.errors",
    "NetworkError": "kvnet.errors",
    "BootstrapError": "kvnet.errors",
    "ListenError": "kvnet.errors",
    "ManifestError": "kvnet.manifest",
    "ArtifactError": "kvnet.pieces",
    "WrongModelError": "kvnet.pieces",
    "StoreError": "kvnet.store",
    "StoreFullError": "kvnet.store",
    "NotFoundError": "kvnet.store",
    "Engine": "kvnet.engine",
    "KV": "kvnet.engine",
    "Manifest": "kvnet.manifest",
    "SignedManifest": "kvnet.manifest",
    "Terms": "kvnet.manifest",
    "Store": "kvnet.store",
    "chain_keys": "kvnet.chain",
    "read_text": "kvnet.tokenizer",
    "publish_tokens": "kvnet.publish",
    "answer": "kvnet.reuse",
    "Node": "kvnet.p2p.node",
    "ReceiptError": "kvnet.receipts",
    "Ledger": "kvnet.ledger",
    "SpendingLimits": "kvnet.ledger",
    "SpendingLimitError": "kvnet.ledger",
    "Client": "kvnet.client",
    "ConfigError": "kvnet.daemon.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
