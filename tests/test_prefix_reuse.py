"""A prompt that shares a prefix of a document reuses exactly the shared whole blocks, and answers
exactly what plain transformers' greedy decode of the whole prompt answers (tests/hf_reference.py)."""

from kvnet.publish import publish_tokens
from kvnet.reuse import answer
from tests.conftest import random_tokens
from tests.hf_reference import hf_greedy, hf_model

B = 256


def test_two_shared_blocks_of_three_reuse_exactly_2B(tiny_fp32, store, key):
    doc = random_tokens(3 * B, seed=21)
    publish_tokens(tiny_fp32, store, key, doc)
    prompt = doc[: 2 * B] + random_tokens(B // 2, seed=22)  # diverges inside block 3
    assert prompt[2 * B] != doc[2 * B]
    match = store.lookup(tiny_fp32.model_id, prompt)
    assert match.n_tokens == 2 * B
    ans = answer(tiny_fp32, store, prompt, 12, stop_at_eos=False)
    assert ans.cached_tokens == 2 * B
    assert ans.tokens == hf_greedy(hf_model(tiny_fp32), prompt, 12).tokens


def test_document_plus_question_reuses_the_whole_document_with_its_partial_tail(tiny_fp32, store, key):
    doc = random_tokens(2 * B + 45, seed=23)
    publish_tokens(tiny_fp32, store, key, doc)
    question = random_tokens(20, seed=24)
    ans = answer(tiny_fp32, store, doc + question, 10, stop_at_eos=False)
    assert ans.cached_tokens == len(doc)
    assert ans.tokens == hf_greedy(hf_model(tiny_fp32), doc + question, 10).tokens


def test_prompt_equal_to_document_keeps_one_token_to_compute(tiny_fp32, store, key):
    doc = random_tokens(B, seed=25)
    publish_tokens(tiny_fp32, store, key, doc)
    ans = answer(tiny_fp32, store, doc, 4, stop_at_eos=False)
    assert ans.cached_tokens == B - 1
    assert ans.tokens == hf_greedy(hf_model(tiny_fp32), doc, 4).tokens


def test_short_prompt_and_unrelated_prompt_reuse_nothing(tiny_fp32, store, key):
    doc = random_tokens(2 * B, seed=26)
    publish_tokens(tiny_fp32, store, key, doc)
    assert store.lookup(tiny_fp32.model_id, doc[: B - 1]) is None  # no block boundary shared
    assert store.lookup(tiny_fp32.model_id, random_tokens(3 * B, seed=27)) is None
    assert answer(tiny_fp32, store, random_tokens(40, seed=28), 3).cached_tokens == 0


def test_longest_of_several_documents_wins(tiny_fp32, store, key):
    doc = random_tokens(3 * B, seed=29)
    publish_tokens(tiny_fp32, store, key, doc[:B])
    publish_tokens(tiny_fp32, store, key, doc[: 2 * B + 10])
    publish_tokens(tiny_fp32, store, key, doc[: 2 * B])
    assert store.lookup(tiny_fp32.model_id, doc).n_tokens == 2 * B + 10
