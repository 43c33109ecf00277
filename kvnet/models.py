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

# Top-level config.json keys left out of the model id, exhaustively (docs/artifact.md, "Model identity"):
# bookkeeping, output switches and the init scale, none of which changes what a forward pass computes.
# The storage dtype is left out because the dtype the model *runs* in enters the id on its own.
CONFIG_IGNORED = frozenset({
    "_name_or_path", "dtype", "initializer_range", "output_attentions", "output_hidden_states",
    "return_dict", "torch_dtype", "transformers_version", "use_cache",
})
_CONFIG_IGNORED = CONFIG_IGNORED  # the old name, kept for importers

MODEL_ID_DOMAIN = "kvnet/model/v2"
# Bumped whenever the weights digest's definition changes, so a cached digest of the old kind is redone.
WEIGHTS_FORMAT = "kvnet/weights/v2"
RUN_DTYPES = ("bf16", "fp16", "fp32")
# safetensors dtype names and their element sizes in bytes.
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


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
    _check_qwen3_folder(ref, path)
    return ResolvedModel(ref, path.resolve(), (path / SYNTHETIC_MARKER).is_file())


def _check_qwen3_folder(ref: str, path: Path) -> None:
    """Refuse a folder whose config.json is invalid JSON or not a Qwen3 model, before loading it:
    transformers would fail later with a multi-line message about tokenizers or shapes."""
    try:
        raw = json.loads((path / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ModelRefError(f"model folder {ref}: config.json is not valid JSON ({reason})") from exc
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind != "qwen3":
        raise ModelRefError(f"model folder {ref} is not a Qwen3 model (config.json model_type is {kind!r}; "
                            "kvnet runs Qwen3 models)")


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
            json.dumps({"name": name, "version": SYNTHETIC_VERSION, "tokenizer": "kvnet-byte-v2"})
        )
        if folder.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ModelRefError(f"config.json: key {k!r} appears twice")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ModelRefError(f"config.json: {name} is not a JSON number")


def parse_config_json(data: bytes) -> dict[str, Any]:
    """config.json bytes as the value that enters the model id.

    JSON numbers written with '.', 'e' or 'E' become binary64 floats (the nearest double, as any
    strtod gives), all other numbers integers; NaN/Infinity, duplicate keys, a BOM or non-UTF-8 bytes
    are refused, so the value is the same in every language that follows docs/artifact.md.
    """
    try:
        text = data.decode("utf-8")
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ModelRefError(f"config.json is not UTF-8 (invalid byte at offset {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ModelRefError(f"config.json is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(raw, dict):
        raise ModelRefError("config.json must hold a JSON object")
    config = {k: v for k, v in raw.items() if k not in CONFIG_IGNORED}
    try:
        canonical.encode(config, allow_float=True)
    except canonical.CanonicalError as exc:
        raise ModelRefError(f"config.json cannot enter the model id: {exc}") from exc
    return config


def canonical_config(folder: Path) -> dict[str, Any]:
    """The architecture config that enters the model id (floats stay floats, encoded as float 64)."""
    try:
        data = (folder / "config.json").read_bytes()
    except OSError as exc:
        raise ModelRefError(f"cannot read {folder / 'config.json'}: {exc.strerror or exc}") from exc
    return parse_config_json(data)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelRefError(f"no *.safetensors weights in {folder}")
    return files


def _file_stamp(files: list[Path]) -> list[list[Any]]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its raw little-endian bytes lie in the file."""

    name: str
    dtype: str  # the safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute file offset
    end: int


def read_safetensors_index(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, read with plain file I/O (no torch, no data loaded).

    Layout: u64 little-endian header length N, N bytes of JSON header, then the data; each tensor's
    `data_offsets` are relative to the end of the header. Sizes are checked against dtype and shape
    so a digest never covers bytes that are not the tensor.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelRefError(f"{path.name}: too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelRefError(f"{path.name}: safetensors header of {n} bytes does not fit")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelRefError(f"{path.name}: safetensors header is not JSON") from exc
    if not isinstance(header, dict):
        raise ModelRefError(f"{path.name}: safetensors header is not a JSON object")
    return [_tensor_entry(path, name, info, 8 + n, size) for name, info in header.items() if name != "__metadata__"]


def _tensor_entry(path: Path, name: str, info: Any, base: int, size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        elem = SAFETENSORS_DTYPES[dtype]
        dims = [int(d) for d in shape if isinstance(d, int) and not isinstance(d, bool) and d >= 0]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelRefError(f"{path.name}: tensor {name!r} has an unusable header entry") from exc
    if len(dims) != len(shape):
        raise ModelRefError(f"{path.name}: tensor {name!r} has a shape that is not a list of sizes")
    count = 1
    for d in dims:
        count *= d
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and base + end <= size
            and end - begin == count * elem):
        raise ModelRefError(f"{path.name}: tensor {name!r} has inconsistent data_offsets")
    return TensorEntry(name, dtype, tuple(dims), path, base + begin, base + end)


def tensor_header(entry: TensorEntry) -> bytes:
    """The canonical map that precedes a tensor's bytes in the weights digest."""
    return canonical.encode({"name": entry.name, "dtype": entry.dtype, "shape": list(entry.shape)})


def _hash_weights(files: list[Path]) -> bytes:
    """Hash every tensor (header map, then raw bytes) in name order, streaming a chunk at a time.

    Hashing tensors rather than files makes the digest independent of the safetensors header layout
    and of how the checkpoint is sharded; reading the bytes straight from the file keeps torch out.
    """
    import blake3

    entries: dict[str, TensorEntry] = {}
    for f in files:
        for e in read_safetensors_index(f):
            if e.name in entries:
                raise ModelRefError(f"tensor {e.name!r} appears in both {entries[e.name].file.name} and {f.name}")
            entries[e.name] = e
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(entries, key=lambda s: s.encode()):
            e = entries[name]
            fh = handles.get(e.file) or handles.setdefault(e.file, e.file.open("rb"))
            h.update(tensor_header(e))
            fh.seek(e.start)
            left = e.end - e.start
            while left:
                chunk = fh.read(min(left, _HASH_CHUNK))
                if not chunk:
                    raise ModelRefError(f"{e.file.name}: ends inside tensor {name!r}")
                h.update(chunk)
                left -= len(chunk)
    finally:
        for fh in handles.values():
            fh.close()
    return h.digest()


def weights_digest(folder: Path) -> bytes:
    """The weights' digest, cached next to the model (or in the cache dir if the folder is read-only)."""
    files = _weight_files(folder)
    stamp = _file_stamp(files)
    candidates = [folder / WEIGHTS_CACHE, cache_dir() / "weights" / (b3(str(folder).encode()).hex() + ".json")]
    for path in candidates:
        try:
            cached = json.loads(path.read_text())
            if cached.get("format") == WEIGHTS_FORMAT and cached.get("stamp") == stamp:
                return bytes.fromhex(cached["digest"])
        except (OSError, ValueError, KeyError):
            continue
    digest = _hash_weights(files)
    record = json.dumps({"format": WEIGHTS_FORMAT, "stamp": stamp, "digest": digest.hex()})
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


def model_id_preimage(config: dict[str, Any], weights: bytes, dtype: str, tokenizer_identity: bytes) -> bytes:
    """The exact bytes whose BLAKE3 is the model id (docs/artifact.md, "Model identity")."""
    if dtype not in RUN_DTYPES:
        raise ModelRefError(f"run dtype must be one of {', '.join(RUN_DTYPES)}, got {dtype!r}")
    if len(weights) != 32 or len(tokenizer_identity) != 32:
        raise ModelRefError("weights digest and tokenizer identity must be 32-byte BLAKE3 digests")
    return canonical.encode({
        "domain": MODEL_ID_DOMAIN,
        "config": config,
        "weights": bytes(weights),
        "dtype": dtype,
        "tokenizer": bytes(tokenizer_identity),
        "kv_layout": KV_LAYOUT_VERSION,
    }, allow_float=True)


def model_id(folder: Path, dtype: str, tokenizer_identity: bytes) -> bytes:
    """BLAKE3 over the config, weights digest, run dtype, tokenizer identity and KV layout version."""
    return b3(model_id_preimage(canonical_config(folder), weights_digest(folder), dtype, tokenizer_identity))
