"""The engine against plain transformers: K and V bitwise, greedy tokens and logits, and prefill
continued after a given KV.

Every other exactness test compares kvnet with kvnet, so a fault in the engine that both sides share
survives them (a uniform shift of every position leaves logits unchanged, since RoPE is relative, but
every stored K is rotated to the wrong position). Here the other side is transformers alone
(tests/hf_reference.py).
"""

import pytest
import torch

from kvnet import exactness
from kvnet.engine import KV
from tests.conftest import random_tokens
from tests.hf_reference import hf_greedy, hf_model, hf_prefill

# A different split of the same computation (other matmul shapes) moves values by a few ulps. Measured
# on 300 tokens, values up to ~7: fp32 max |diff| 2.6e-6; bf16 2**-6 (one bf16 step at 4..8 is 2**-5).
# A wrong prefix or wrong positions move values by ~8 (measured 8.1).
TOL = {"fp32": 1e-4, "bf16": 2.0**-4}
LOGIT_TOL_FP32 = 1e-4
WRONG = 1.0  # 16x the largest tolerance, 8x below what a wrong prefix was measured to cause


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 300])
def test_prefill_kv_is_bitwise_a_plain_transformers_forward(request, dtype, n):
    engine = request.getfixturevalue(f"tiny_{dtype}")
    doc = random_tokens(n, seed=100 + n)  # pad and chat specials included
    kv = engine.prefill(doc)
    keys, values = hf_prefill(hf_model(engine), doc)
    assert kv.n_tokens == n
    assert _bitwise(kv.keys, keys), f"K differs from transformers by {_max_diff(kv.keys, keys)}"
    assert _bitwise(kv.values, values), f"V differs from transformers by {_max_diff(kv.values, values)}"


def test_generate_from_matches_transformers_greedy_decode(tiny_fp32):
    doc, suffix = random_tokens(300, seed=31), random_tokens(7, seed=32)
    ref = hf_greedy(hf_model(tiny_fp32), doc + suffix, 24)
    assert len(set(ref.tokens)) > 1  # a continuation of one repeated token would prove nothing
    reuse = tiny_fp32.generate_from(tiny_fp32.prefill(doc), suffix, 24, return_logits=True)
    oneshot = tiny_fp32.generate_from(None, doc + suffix, 24, return_logits=True)
    for got in (reuse, oneshot):
        assert got.tokens == ref.tokens
        assert exactness.max_logit_diff(got, ref) < LOGIT_TOL_FP32


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("split", [1, 137, 256, 299])
def test_prefill_after_kv_equals_one_pass_of_all_tokens(request, dtype, split):
    """prefill(rest, kv=prefill(first)) is the KV of first + rest, positions split..n-1 included.

    Within TOL, not bitwise. Measured against one pass of all 300 tokens: positions 0..split-1 (a
    shorter forward pass) differ by up to 2.6e-6 (fp32) / 2**-6 (bf16); positions split..299 were
    bitwise equal at splits 137 and 256 and in bf16, and up to 3.2e-6 off in fp32 at splits 1 and 299."""
    engine = request.getfixturevalue(f"tiny_{dtype}")
    doc = random_tokens(300, seed=33)
    first = engine.prefill(doc[:split])
    both = engine.prefill(doc[split:], kv=first)
    keys, values = hf_prefill(hf_model(engine), doc)
    assert both.n_tokens == len(doc)
    assert _bitwise(both.prefix(split).keys + both.prefix(split).values, first.keys + first.values)
    assert _max_diff(both.keys + both.values, keys + values) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prefill_after_a_wrong_prefix_differs_by_far_more_than_the_tolerance(request, dtype):
    """The tolerance above is meaningful: a KV prefix of another document changes the rest a lot."""
    engine = request.getfixturevalue(f"tiny_{dtype}")
    doc = random_tokens(300, seed=33)
    wrong = engine.prefill(random_tokens(137, seed=34))
    both = engine.prefill(doc[137:], kv=wrong)
    keys, values = hf_prefill(hf_model(engine), doc)
    tail = [t[:, :, 137:] for t in both.keys + both.values]
    assert _max_diff(tail, [t[:, :, 137:] for t in keys + values]) > WRONG


def test_prefill_after_kv_leaves_the_callers_kv_unmodified(tiny_fp32):
    doc = random_tokens(300, seed=35)
    first = tiny_fp32.prefill(doc[:137])
    before = KV([k.clone() for k in first.keys], [v.clone() for v in first.values])
    tiny_fp32.prefill(doc[137:], kv=first)
    tiny_fp32.prefill(doc[137:200], kv=first)
    assert first.n_tokens == 137
    assert _bitwise(first.keys + first.values, before.keys + before.values)
