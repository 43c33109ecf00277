"""The model engine: prefill a token sequence into KV, and continue greedily from a KV prefix.

Traps handled here (see shared/NOTES.md): transformers 5.x takes `cache=`; a cache is valid only as a
prefix at positions 0..L-1, so continuation passes explicit `position_ids = L..L+S-1`; no attention mask
is built from token values, so a document token equal to the pad id is never mistaken for padding; and
the caller's KV is never mutated (the cache we hand the model wraps the caller's tensors, and
DynamicLayer.update concatenates into new tensors instead of writing into them).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvnet import models
from kvnet.errors import KvnetError
from kvnet.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class EngineError(KvnetError, ValueError):
    """The engine was asked for something it cannot do (wrong model, bad tokens, bad KV shape)."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV: all that a loader needs to interpret artifact bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.itemsize


@dataclass
class KV:
    """A KV prefix: per layer, K and V of shape [1, kv_heads, n_tokens, head_dim] at positions 0..n-1."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0

    def prefix(self, n: int) -> KV:
        """The first n tokens, as views (no copy). Valid because KV at position i depends only on 0..i."""
        if not 0 <= n <= self.n_tokens:
            raise EngineError(f"prefix of {n} tokens requested from a KV of {self.n_tokens}")
        return KV([k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values])


@dataclass
class Generation:
    """Greedy continuation: the new tokens and, if asked, the logits that chose each one."""

    tokens: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)
    kv: KV | None = None


def compute_profile(attn_implementation: str) -> dict[str, str]:
    """What bitwise exactness is promised within: device kind, library versions, attention kernel."""
    import transformers

    return {
        "device": f"cpu-{platform.machine()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn": attn_implementation,
    }


class Engine:
    """A Qwen3 model loaded from a model ref, with its tokenizer, identity and KV layout."""

    def __init__(
        self,
        ref: str,
        dtype: str = "bf16",
        progress: Callable[[str], None] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if dtype not in DTYPES:
            raise EngineError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.resolved = models.resolve(ref, progress)
        self.dtype = dtype
        self.tokenizer: Tokenizer = (
            ByteTokenizer() if self.resolved.synthetic else HFTokenizer(self.resolved.folder)
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            str(self.resolved.folder), dtype=DTYPES[dtype], local_files_only=True
        ).eval()
        cfg = self.model.config
        self.layout = KVLayout(
            layers=cfg.num_hidden_layers,
            kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            dtype=dtype,
        )
        self.profile = compute_profile(cfg._attn_implementation or "eager")
        self.model_id = models.model_id(self.resolved.folder, dtype, self.tokenizer.identity())

    # -- cache plumbing -------------------------------------------------------------------------

    def _cache_from(self, kv: KV | None) -> Any:
        """A DynamicCache that wraps `kv`'s tensors without copying them."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if kv is None or kv.n_tokens == 0:
            return cache
        self.check_kv(kv)
        for layer, k, v in zip(cache.layers, kv.keys, kv.values, strict=True):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        return cache

    @staticmethod
    def _kv_from(cache: Any) -> KV:
        return KV([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])

    def check_kv(self, kv: KV) -> None:
        """Refuse KV whose shape or dtype does not fit this model."""
        lay = self.layout
        if len(kv.keys) != lay.layers or len(kv.values) != lay.layers:
            raise EngineError(f"KV has {len(kv.keys)} layers, model has {lay.layers}")
        want = (1, lay.kv_heads, kv.n_tokens, lay.head_dim)
        for t in (*kv.keys, *kv.values):
            if tuple(t.shape) != want or t.dtype != DTYPES[lay.dtype]:
                raise EngineError(f"KV tensor {tuple(t.shape)} {t.dtype} does not fit {want} {lay.dtype}")

    def _check_tokens(self, tokens: list[int]) -> None:
        vocab = self.model.config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"token ids out of range [0, {vocab}): {bad[:5]}")

    # -- the two operations ---------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, tokens: list[int], cache: Any, start: int, on_layer: Callable[[int], None] | None):
        ids = torch.tensor([tokens], dtype=torch.long)
        pos = torch.arange(start, start + len(tokens), dtype=torch.long).unsqueeze(0)
        hooks = []
        if on_layer is not None:
            for i, layer in enumerate(self.model.model.layers):
                hooks.append(layer.register_forward_hook(lambda *_a, i=i: on_layer(i + 1)))
        try:
            return self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()

    def prefill(
        self,
        tokens: list[int],
        kv: KV | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> KV:
        """KV of `tokens` (continuing after `kv` if given), in one forward pass.

        One pass, never chunked: the KV bytes of a document are then a function of the document, model
        and profile alone, so every publisher of the same document produces identical piece hashes.
        With `kv`, `tokens` run at positions kv.n_tokens.. after it, and the caller's `kv` is left
        unchanged: that recomputes block j from blocks 0..j-1's KV (block audits). The result equals a
        one-pass prefill within rounding, not bitwise (tests/test_engine_reference.py states by how much).
        `on_layer(i)` reports progress after decoder layer i.
        """
        if not tokens:
            raise EngineError("prefill needs at least one token")
        self._check_tokens(tokens)
        cache = self._cache_from(kv)
        start = kv.n_tokens if kv is not None else 0
        self._forward(tokens, cache, start, on_layer)
        return self._kv_from(cache)

    @torch.inference_mode()
    def generate_from(
        self,
        kv: KV | None,
        suffix: list[int],
        max_new_tokens: int,
        return_logits: bool = False,
        stop_at_eos: bool = False,
    ) -> Generation:
        """Greedy continuation of (KV prefix + suffix). `suffix` must be non-empty: the logits that pick
        the first new token come from its last position. The caller's `kv` is left untouched."""
        if not suffix:
            raise EngineError("generate_from needs at least one suffix token after the KV prefix")
        self._check_tokens(suffix)
        cache = self._cache_from(kv)
        pos = kv.n_tokens if kv is not None else 0
        out = Generation(tokens=[])
        step = suffix
        for _ in range(max_new_tokens):
            logits = self._forward(step, cache, pos, None).logits[0, -1].float()
            pos += len(step)
            nxt = int(torch.argmax(logits))
            out.tokens.append(nxt)
            if return_logits:
                out.logits.append(logits.clone())
            if stop_at_eos and nxt == self.tokenizer.eos_token_id:
                break
            step = [nxt]
        out.kv = self._kv_from(cache)
        return out
