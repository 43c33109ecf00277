"""Forward-pass FLOPs of a Qwen3-style decoder, counted analytically from its config.

Why analytical: the paper states reuse is 9-50x cheaper "in compute"; a wall-clock ratio on one machine
mixes compute with memory traffic and Python overhead, so the table shows both side by side.

Counted (a multiply-add is 2 FLOPs), per decoder layer, for `n` new tokens after a cached prefix of `p`:
  - projections: q (h -> nq*d), k and v (h -> nkv*d each), o (nq*d -> h): 2*n*h*d*(2*nq + 2*nkv)
  - MLP (SwiGLU: gate, up, down): 2*n*3*h*I
  - attention: scores Q.K^T and the weighted sum over V, each 2*nq*d per (query, key) pair; new token
    i (0-based) attends to p + i + 1 keys (causal), so the pairs are n*p + n*(n+1)/2: the L^2 term.
plus the LM head for the last position only (kvnet asks for one position's logits: logits_to_keep=1):
2*h*V. Left out, as small next to these: embeddings (a lookup), RMSNorms, RoPE, softmax, SiLU, residuals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FlopCount", "forward_flops", "prefill_flops", "reuse_flops"]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass, by part."""

    projections: int
    mlp: int
    attention: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.projections + self.mlp + self.attention + self.lm_head


def _dims(config: Mapping[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    h = int(config["hidden_size"])
    nq = int(config["num_attention_heads"])
    nkv = int(config.get("num_key_value_heads") or nq)
    d = int(config.get("head_dim") or h // nq)
    return h, nq, nkv, d, int(config["intermediate_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])


def forward_flops(config: Mapping[str, Any], new_tokens: int, cached_tokens: int = 0,
                  logits_positions: int = 1) -> FlopCount:
    """FLOPs of one forward pass of `new_tokens` tokens after a KV prefix of `cached_tokens`."""
    if new_tokens < 1 or cached_tokens < 0:
        raise ValueError("a forward pass needs at least one new token and a non-negative prefix")
    h, nq, nkv, d, inter, layers, vocab = _dims(config)
    n, p = new_tokens, cached_tokens
    pairs = n * p + n * (n + 1) // 2
    return FlopCount(
        projections=layers * 2 * n * h * d * (2 * nq + 2 * nkv),
        mlp=layers * 2 * n * 3 * h * inter,
        attention=layers * 2 * 2 * nq * d * pairs,
        lm_head=2 * h * vocab * min(logits_positions, n),
    )


def prefill_flops(config: Mapping[str, Any], doc_tokens: int, question_tokens: int) -> FlopCount:
    """Full prefill of document + question in one pass, up to the first token's logits."""
    return forward_flops(config, doc_tokens + question_tokens)


def reuse_flops(config: Mapping[str, Any], doc_tokens: int, question_tokens: int) -> FlopCount:
    """Reuse: the question's pass after the document's loaded KV, up to the first token's logits."""
    return forward_flops(config, question_tokens, doc_tokens)
