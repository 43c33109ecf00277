"""Plain transformers, as an independent reference for kvnet's engine.

Comparing kvnet against kvnet cannot catch a fault both sides share (every position shifted by one,
a decode step at the wrong position): RoPE is relative, so a uniform shift leaves logits unchanged
while the stored K is wrong for every other reader. These helpers run the same model folder through
transformers' own code paths only (its forward with default positions, its own greedy `generate`),
never through `kvnet.engine`.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kvnet.engine import DTYPES, Engine, Generation


@functools.cache
def _load(folder: str, dtype: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True).eval()


def hf_model(engine: Engine) -> torch.nn.Module:
    """A second, separately loaded copy of the engine's model (same folder, same dtype)."""
    return _load(str(engine.resolved.folder), engine.dtype)


@torch.inference_mode()
def hf_prefill(model: torch.nn.Module, tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V of `tokens` from `model(input_ids, use_cache=True)`: positions are whatever
    transformers assigns by default (0..n-1), not something kvnet passes in."""
    out = model(torch.tensor([tokens], dtype=torch.long), use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> Generation:
    """transformers' own greedy decode of the full prompt, with its raw (unprocessed) logits.

    The attention mask is explicit (all ones): a prompt token equal to the pad id must not become
    padding. EOS does not stop it, so it always yields `max_new_tokens` tokens, as
    `generate_from(..., stop_at_eos=False)` does.
    """
    cfg = model.config
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                           eos_token_id=None, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id)
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens, "reference decode stopped early"
    return Generation(tokens=tokens, logits=[step[0].float() for step in out.logits])
