"""The exactness experiment: is KV loaded from a published artifact as good as computing it?

The parent process publishes a seeded document to a store. A fresh process then
  A. loads the artifact from disk and continues greedily after a suffix,
  B. computes prefill(document) itself and continues the same way (prefill-then-continue),
  C. prefills document + suffix in one shot and continues,
and reports how far A agrees with B (expected: bitwise) and with C (expected: fp32 all tokens; bf16
within rounding, where near-tied tokens may flip). The JSON format is documented in docs/exactness.md.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvnet.engine import Engine, Generation
from kvnet.tokenizer import Tokenizer

SUFFIX_TEXT = "\n\nQuestion: what is the document above about? Answer in one sentence.\nAnswer:"
_WORDS = tuple(
    "the cache of keys and values grows with every token a model reads while prefill costs time "
    "attention compares each position with all earlier ones so long documents are expensive to read "
    "twice network peers share signed pieces verified by hash before use agents continue generation".split()
)


def seeded_document(tokenizer: Tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """Exactly `n_tokens` tokens of seeded pseudo-text (deterministic for a tokenizer and seed)."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < n_tokens:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18)))
        tokens += tokenizer.encode(sentence.capitalize() + ". ")
    return tokens[:n_tokens]


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def max_logit_diff(a: Generation, b: Generation) -> float:
    """Largest |logit difference| over the steps where both runs had seen the same tokens."""
    steps = min(matching_prefix(a.tokens, b.tokens) + 1, len(a.logits), len(b.logits))
    return max((float((a.logits[i] - b.logits[i]).abs().max()) for i in range(steps)), default=0.0)


def run_worker(model: str, dtype: str, store_dir: Path, manifest_id: bytes, doc_tokens: int, seed: int,
               new_tokens: int) -> dict[str, Any]:
    """Steps A, B and C, in the current (fresh) process."""
    from kvnet.reuse import load_prefix
    from kvnet.store import Store

    engine = Engine(model, dtype)
    doc = seeded_document(engine.tokenizer, doc_tokens, seed)
    suffix = engine.tokenizer.encode(SUFFIX_TEXT)
    with Store(store_dir) as store:
        t0 = time.perf_counter()
        loaded = load_prefix(engine, store, manifest_id)
        load_s = time.perf_counter() - t0
    a = engine.generate_from(loaded, suffix, new_tokens, return_logits=True)
    t0 = time.perf_counter()
    own = engine.prefill(doc)
    prefill_s = time.perf_counter() - t0
    b = engine.generate_from(own, suffix, new_tokens, return_logits=True)
    c = engine.generate_from(None, doc + suffix, new_tokens, return_logits=True)
    same_kv = all(torch.equal(x, y) for x, y in zip(loaded.keys + loaded.values, own.keys + own.values,
                                                     strict=True))
    return {
        "tokens_total": new_tokens,
        "tokens_match": matching_prefix(a.tokens, b.tokens),
        "max_logit_diff": max_logit_diff(a, b),
        "oneshot_tokens_match": matching_prefix(a.tokens, c.tokens),
        "oneshot_max_logit_diff": max_logit_diff(a, c),
        "kv_bitwise_equal": same_kv,
        "suffix_tokens": len(suffix),
        "load_s": round(load_s, 4),
        "prefill_s": round(prefill_s, 4),
        "distinct_tokens": len(set(a.tokens)),
        "tokens": a.tokens,
    }


def run(model: str, doc_tokens: int, new_tokens: int, dtype: str = "bf16", seed: int = 0,
        store_dir: Path | None = None, progress: Any = None) -> dict[str, Any]:
    """Publish in this process, verify in a fresh one; return the combined JSON-able report."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kvnet.publish import publish_tokens
    from kvnet.store import Store

    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvnet-exactness-")
        store_dir = Path(tmp.name)
    try:
        engine = Engine(model, dtype, progress=progress)
        doc = seeded_document(engine.tokenizer, doc_tokens, seed)
        with Store(store_dir) as store:
            pub = publish_tokens(engine, store, Ed25519PrivateKey.generate(), doc)
        m = pub.signed.manifest
        del engine
        cmd = [sys.executable, "-m", "kvnet.exactness", model, dtype, str(store_dir), pub.signed.id.hex(),
               str(doc_tokens), str(seed), str(new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"exactness worker failed:\n{proc.stderr[-4000:]}")
        worker = json.loads(proc.stdout.strip().splitlines()[-1])
        return {
            "model": model, "dtype": dtype, "model_id": m.model_id.hex(), "profile": m.profile,
            "doc_tokens": doc_tokens, "new_tokens": new_tokens, "seed": seed,
            "manifest_id": pub.signed.id.hex(), "artifact_bytes": m.total_bytes,
            "bytes_per_token": m.bytes_per_token, "pieces": len(m.pieces),
            "publish_prefill_s": round(pub.prefill_s, 4), "publish_total_s": round(pub.total_s, 4),
            **worker,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":  # the fresh-process half of `run`
    model, dtype, store, mid, n, seed, k = sys.argv[1:8]
    report = run_worker(model, dtype, Path(store), bytes.fromhex(mid), int(n), int(seed), int(k))
    print(json.dumps(report))
