"""Reuse: find the longest stored prefix of a prompt, load it verified, prefill only the rest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kvnet import artifact
from kvnet.engine import KV, Engine
from kvnet.errors import KvnetError
from kvnet.manifest import Manifest
from kvnet.store import Store

log = logging.getLogger("kvnet.reuse")


def load_prefix(engine: Engine, store: Store, manifest_id: bytes, n_tokens: int | None = None,
                builder: artifact.KVBuilder | None = None) -> KV:
    """Load (the first n_tokens of) a stored artifact, verifying every piece against its manifest.

    `builder`: the KVBuilder a fetch of this artifact filled as its pieces verified (`Node.fetch`'s
    `on_verified`); only the pieces it lacks (those the store already held) are read here. A builder
    made for another manifest or prefix length is not used."""
    m = store.get_manifest(manifest_id).manifest
    if builder is not None and not builder.made_for(m, n_tokens):
        builder = None
    if m.profile != engine.profile:
        log.warning("artifact %s was computed under profile %s, this engine runs %s: expect rounding-level "
                    "differences, not bitwise exactness", manifest_id.hex()[:16], m.profile, engine.profile)
    kv = artifact.load_kv(m, engine, lambda i: store.read_piece(manifest_id, i, verify=False), n_tokens, builder)
    store.touch(manifest_id)
    return kv


def prefix_builder(engine: Engine, m: Manifest, n_tokens: int, prompt_len: int) -> artifact.KVBuilder | None:
    """The KVBuilder for a fetch of `n_tokens` of `m` that a prompt of `prompt_len` tokens will reuse
    (all of them but the prompt's last); None when nothing of it would be used or `m` does not fit
    this engine (the load then says why)."""
    try:
        return artifact.KVBuilder(m, engine, min(n_tokens, prompt_len - 1))
    except KvnetError:
        return None


@dataclass(frozen=True)
class Answer:
    tokens: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int
    manifest_id: bytes | None
    load_s: float
    prefill_s: float  # prefill of the uncached rest of the prompt (and the first new token)
    generate_s: float


def answer(engine: Engine, store: Store, prompt: list[int], max_new_tokens: int,
           stop_at_eos: bool = True, built: artifact.KVBuilder | None = None) -> Answer:
    """Greedy answer to `prompt`, reusing the longest stored prefix of it.

    At most len(prompt) - 1 tokens are reused: the logits for the first new token come from the last
    prompt position, which must be computed here. `built`: the KV a fetch just built of that prefix
    (`prefix_builder`), used if it is the one the lookup finds.
    """
    t0 = time.perf_counter()
    match = store.lookup(engine.model_id, prompt)
    kv, mid, cached = None, None, 0
    if match is not None:
        mid, cached = match.manifest_id, min(match.n_tokens, len(prompt) - 1)
        if cached > 0:
            kv = load_prefix(engine, store, mid, cached, built)
        else:
            mid = None
    t1 = time.perf_counter()
    first = engine.generate_from(kv, prompt[cached:], 1)
    t2 = time.perf_counter()
    tokens = list(first.tokens)
    if max_new_tokens > 1 and not (stop_at_eos and tokens[-1] == engine.tokenizer.eos_token_id):
        rest = engine.generate_from(first.kv, tokens[-1:], max_new_tokens - 1,
                                    stop_at_eos=stop_at_eos)
        tokens += rest.tokens
    t3 = time.perf_counter()
    return Answer(tokens, engine.tokenizer.decode(tokens), len(prompt), cached, mid, t1 - t0, t2 - t1, t3 - t2)
