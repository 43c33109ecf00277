"""KV published under one model id is refused by an engine running another."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvnet import artifact, canonical, models
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


def _copy_model(tiny_bf16, tmp_path) -> Path:
    folder = tmp_path / "tiny-copy"
    shutil.copytree(tiny_bf16.resolved.folder, folder)
    (folder / models.WEIGHTS_CACHE).unlink(missing_ok=True)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_only_the_listed_config_keys_are_ignored(tiny_bf16, tmp_path):
    folder = _copy_model(tiny_bf16, tmp_path)
    tok = tiny_bf16.tokenizer.identity()
    _edit_config(folder, transformers_version="9.9.9", torch_dtype="float32", use_cache=False)
    assert models.model_id(folder, "bf16", tok) == tiny_bf16.model_id
    _edit_config(folder, rope_theta=10000)
    assert models.model_id(folder, "bf16", tok) != tiny_bf16.model_id
    _edit_config(folder, rope_theta=1000000.0)  # 1e6 written as a float is another config than the int
    assert models.model_id(folder, "bf16", tok) != tiny_bf16.model_id


def test_a_weights_cache_of_another_format_is_not_trusted(tiny_bf16, tmp_path):
    folder = _copy_model(tiny_bf16, tmp_path)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*.safetensors"))]
    (folder / models.WEIGHTS_CACHE).write_text(json.dumps({"stamp": stamp, "digest": "00" * 32}))
    assert models.model_id(folder, "bf16", tiny_bf16.tokenizer.identity()) == tiny_bf16.model_id


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"a": NaN}', '{"a": 1, "a": 2}'])
def test_unusable_config_json_is_a_clear_error(tiny_bf16, tmp_path, text):
    folder = _copy_model(tiny_bf16, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(models.ModelRefError, match="config.json"):
        models.model_id(folder, "bf16", tiny_bf16.tokenizer.identity())


def test_weights_digest_matches_a_safetensors_read(tiny_bf16):
    """The plain-file digest covers exactly the bytes safetensors itself returns for each tensor."""
    import blake3
    from safetensors import safe_open

    folder = tiny_bf16.resolved.folder
    h = blake3.blake3()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
        for name in sorted(sf.keys()):  # noqa: SIM118 - safe_open has no __iter__
            t = sf.get_tensor(name)
            dtype = {"torch.bfloat16": "BF16", "torch.float32": "F32"}[str(t.dtype)]
            h.update(canonical.encode({"name": name, "dtype": dtype, "shape": list(t.shape)}))
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert models.weights_digest(folder) == h.digest()
