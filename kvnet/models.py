"""Model refs: a local Hugging Face folder, or a built-in synthetic Qwen3 with seeded random weights.

Synthetic models are built tensor by tensor from seeds derived from the tensor names, written once to
the user's cache dir as an ordinary HF folder, and from then on loaded like any real checkpoint. The
model id is computed from that folder, so a synthetic model and a real one follow the same path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from kvnet import canonical
from kvnet.errors import KvnetError
from kvnet.hashing import b3

KV_LAYOUT_VERSION = 1
SYNTHETIC_VERSION = 1
SYNTHETIC_MARKER = "kvnet-synthetic.json"
WEIGHTS_CACHE = ".kvnet-weights.json"

# With transformers' default initializer_range (0.02) a random Qwen3 repeats one token forever, which
# would make every exactness test trivially true. 0.2 gives varied greedy continuations.
SYNTHETIC_INIT_STD = 0.2

_QWEN3_COMMON: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
    "initializer_range": SYNTHETIC_INIT_STD,
}

SYNTHETIC_CONFIGS: dict[str, dict[str, Any]] = {
    # Two layers and a few thousand parameters' worth of width: fast enough for every test.
    "tiny": {
        **_QWEN3_COMMON,
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_window_layers": 2, "max_position_embeddings": 8192,
        "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 256,
    },
    # The published Qwen3-0.6B and Qwen3-4B architecture configs.
    "qwen3-0.6b-shape": {
        **_QWEN3_COMMON,
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_window_layers": 28,
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "qwen3-4b-shape": {
        **_QWEN3_COMMON,
        "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_window_layers": 36,
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
}

# Config keys that do not change what the model computes.
_CONFIG_IGNORED = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "initializer_range",
}


class ModelRefError(KvnetError, ValueError):
    """A model ref names nothing loadable."""


def cache_dir() -> Path:
    """Where synthetic models live: $KVNET_CACHE_DIR, else the user's cache dir."""
    env = os.environ.get("KVNET_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("kvnet"))


@dataclass(frozen=True)
class ResolvedModel:
    """A model ref resolved to a folder on disk."""

    ref: str
    folder: Path
    synthetic: bool


def resolve(ref: str, progress: Callable[[str], None] | None = None) -> ResolvedModel:
    """Turn a model ref into a folder, building a synthetic model on first use."""
    if ref in SYNTHETIC_CONFIGS:
        folder = cache_dir() / "models" / f"{ref}-v{SYNTHETIC_VERSION}"
        if not (folder / SYNTHETIC_MARKER).is_file():
            build_synthetic(ref, folder, progress)
        return ResolvedModel(ref, folder, True)
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(SYNTHETIC_CONFIGS)
        raise ModelRefError(f"model ref {ref!r} is neither a folder with config.json nor one of: {known}")
    return ResolvedModel(ref, path.resolve(), (path / SYNTHETIC_MARKER).is_file())


def _tensor_seed(model_name: str, tensor_name: str) -> int:
    digest = b3(f"kvnet/synthetic/v{SYNTHETIC_VERSION}/{model_name}/{tensor_name}".encode())
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def synthetic_state_dict(name: str) -> dict[str, Any]:
    """Seeded bf16 weights for a synthetic model, one tensor at a time (peak memory: bf16 size + 1 tensor)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SYNTHETIC_CONFIGS[name])
    with torch.device("meta"):
        skeleton = Qwen3ForCausalLM(config)
    tied = config.tie_word_embeddings
    out: dict[str, torch.Tensor] = {}
    for tname, param in skeleton.state_dict().items():
        if tied and tname == "lm_head.weight":
            continue
        if tname.endswith("norm.weight"):
            out[tname] = torch.ones(param.shape, dtype=torch.bfloat16)
            continue
        gen = torch.Generator().manual_seed(_tensor_seed(name, tname))
        t = torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(SYNTHETIC_INIT_STD)
        out[tname] = t.to(torch.bfloat16)
        del t
    return out


def build_synthetic(name: str, folder: Path, progress: Callable[[str], None] | None = None) -> None:
    """Write a synthetic model as an HF folder, atomically (a killed build leaves nothing half-written)."""
    from safetensors.torch import save_file

    if progress:
        progress(f"building synthetic model {name} (once) in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        config = dict(SYNTHETIC_CONFIGS[name])
        config["torch_dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(synthetic_state_dict(name), str(tmp / "model.safetensors"))
        (tmp / SYNTHETIC_MARKER).write_text(
            json.dumps({"name": name, "version": SYNTHETIC_VERSION, "tokenizer": "kvnet-byte-v1"})
        )
        if folder.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def canonical_config(folder: Path) -> dict[str, Any]:
    """The architecture config as a canonical-encodable dict (floats as repr strings)."""
    raw = json.loads((folder / "config.json").read_text())

    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return {k: norm(v) for k, v in raw.items() if k not in _CONFIG_IGNORED}


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelRefError(f"no *.safetensors weights in {folder}")
    return files


def _file_stamp(files: list[Path]) -> list[list[Any]]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _hash_weights(files: list[Path]) -> bytes:
    """Hash every tensor (name, dtype, shape, raw bytes) in name order, streaming one tensor at a time.

    Hashing tensors rather than files makes the digest independent of the safetensors header layout
    and of how the checkpoint is sharded.
    """
    import blake3
    import torch
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[k] = f
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(where):
            f = where[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt").__enter__()
            t = handles[f].get_tensor(name)
            h.update(canonical.encode({"name": name, "dtype": str(t.dtype), "shape": list(t.shape)}))
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy())
            del t
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return h.digest()


def weights_digest(folder: Path) -> bytes:
    """The weights' digest, cached next to the model (or in the cache dir if the folder is read-only)."""
    files = _weight_files(folder)
    stamp = _file_stamp(files)
    candidates = [folder / WEIGHTS_CACHE, cache_dir() / "weights" / (b3(str(folder).encode()).hex() + ".json")]
    for path in candidates:
        try:
            cached = json.loads(path.read_text())
            if cached.get("stamp") == stamp:
                return bytes.fromhex(cached["digest"])
        except (OSError, ValueError, KeyError):
            continue
    digest = _hash_weights(files)
    record = json.dumps({"stamp": stamp, "digest": digest.hex()})
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(record)
            os.replace(tmp, path)
            break
        except OSError:
            continue
    return digest


def model_id(folder: Path, dtype: str, tokenizer_identity: bytes) -> bytes:
    """BLAKE3 over the canonical config, weights, run dtype, tokenizer identity and KV layout version."""
    return b3(canonical.encode({
        "domain": "kvnet/model/v1",
        "config": canonical_config(folder),
        "weights": weights_digest(folder),
        "dtype": dtype,
        "tokenizer": tokenizer_identity,
        "kv_layout": KV_LAYOUT_VERSION,
    }))
