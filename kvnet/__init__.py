"""kvnet: publish a document's KV cache once, reuse it token-exactly everywhere.

Module map (lower layers never import upper ones):
  canonical, hashing  -> encodings and BLAKE3 helpers shared by every format
  tokenizer, models   -> tokenizers and model refs (local folders, synthetic models)
  engine              -> prefill / continue-from-KV on a Qwen3 model
  chain               -> chain keys: the address of a KV prefix
  identity, manifest  -> Ed25519 keys and the signed artifact manifest
  artifact            -> KV <-> block-major bytes <-> verified pieces
  store               -> crash-safe content-addressed local store with an SQLite index
  publish, reuse      -> the offline workflows the CLI drives
  cli                 -> the `kvnet` command
"""

__version__ = "0.1.0"
