"""Tokenizers: a download-free byte-level tokenizer for synthetic models, and local HF tokenizers.

Both expose the same small interface, including `identity`, a digest that goes into the model id:
two tokenizers that could map the same text to different ids must never share a model id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from kvnet import canonical
from kvnet.errors import InputError
from kvnet.hashing import b3

# The special tokens of Qwen3's chat format, in Qwen3's order.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def read_text(path: Path) -> str:
    """A document or prompt file as text: its exact bytes, which must be UTF-8 and not binary.

    No locale, no newline translation, no BOM handling: the text is the file's bytes decoded as UTF-8,
    so every machine tokenizes the same file to the same ids (docs/artifact.md, "Tokenization").
    A file with a NUL byte is treated as binary and refused.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        raise InputError(f"{path} is binary (it contains NUL bytes), not a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from exc


class Tokenizer(Protocol):
    vocab_size: int
    pad_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def identity(self) -> bytes: ...


class ByteTokenizer:
    """Bytes 0-255 map to ids 0-255; Qwen3's chat special tokens follow at 256.

    Deterministic and dependency-free, so synthetic models tokenize identically on every machine.
    """

    name = "kvnet-byte-v1"

    def __init__(self) -> None:
        self.special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_by_id = {v: k for k, v in self.special.items()}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.pad_token_id = self.special["<|endoftext|>"]
        self.eos_token_id = self.special["<|im_end|>"]
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            out.append(self.special_by_id.get(i, f"<|unk{i}|>"))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def identity(self) -> bytes:
        return b3(canonical.encode({"name": self.name, "special": list(SPECIAL_TOKENS)}))


# Files whose bytes define a Hugging Face tokenizer's behaviour.
_HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
)


class HFTokenizer:
    """A tokenizer loaded from a local model folder; never downloads."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.folder = folder
        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        self.eos_token_id = int(eos if eos is not None else 0)
        pad = self.tok.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def identity(self) -> bytes:
        files = {}
        for name in _HF_TOKENIZER_FILES:
            path = self.folder / name
            if path.is_file():
                files[name] = b3(path.read_bytes())
        return b3(canonical.encode({"name": "hf", "files": files}))
