"""KV published under one model id is refused by an engine running another."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from kvnet import artifact, models
from kvnet.engine import Engine
from kvnet.publish import publish_tokens
from kvnet.reuse import load_prefix
from tests.conftest import random_tokens


def test_other_dtype_is_another_model(tiny_bf16, tiny_fp32, store, key):
    assert tiny_bf16.model_id != tiny_fp32.model_id
    pub = publish_tokens(tiny_bf16, store, key, random_tokens(300, seed=1))
    with pytest.raises(artifact.WrongModelError, match="refusing to load"):
        load_prefix(tiny_fp32, store, pub.manifest_id)
    # and the store never offers it to that engine in the first place
    assert store.lookup(tiny_fp32.model_id, random_tokens(300, seed=1) + [1]) is None


def test_one_changed_weight_is_another_model(tiny_bf16, store, key, tmp_path):
    folder = tmp_path / "tiny-edited"
    shutil.copytree(tiny_bf16.resolved.folder, folder)
    (folder / models.WEIGHTS_CACHE).unlink(missing_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][0] += 1
    save_file(weights, folder / "model.safetensors")
    edited = Engine(str(folder), "bf16")
    assert edited.model_id != tiny_bf16.model_id
    pub = publish_tokens(tiny_bf16, store, key, random_tokens(50, seed=2))
    with pytest.raises(artifact.WrongModelError):
        load_prefix(edited, store, pub.manifest_id)


def test_model_id_is_stable_and_cached(tiny_bf16):
    again = models.model_id(tiny_bf16.resolved.folder, "bf16", tiny_bf16.tokenizer.identity())
    assert again == tiny_bf16.model_id
    assert (tiny_bf16.resolved.folder / models.WEIGHTS_CACHE).is_file()
