"""Tokenizers: a download-free byte-level tokenizer for synthetic models, and local HF tokenizers.

Both expose the same small interface, including `identity`, a digest that goes into the model id:
two tokenizers that could map the same text to different ids must never share a model id.

`encode(text)` treats every character of the text as text: a special-token string such as
`<|im_end|>` inside a document or prompt is tokenized like any other characters, never as the special
id, so a document cannot forge chat structure. Special ids enter only through `special_id(name)` and
`encode_chat`, for code that builds chat prompts itself (docs/artifact.md, "Tokenization").
"""

from __future__ import annotations

from collections.abc import Sequence
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
    def special_id(self, name: str) -> int: ...
    def identity(self) -> bytes: ...


def encode_chat(tok: Tokenizer, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Qwen3's chat format: `<|im_start|>` role "\n" content `<|im_end|>` "\n" per message.

    The structure tokens are special ids; roles and contents are encoded as text, so a message
    that contains `<|im_end|>` cannot close its turn early. With `add_generation_prompt` the ids end
    with `<|im_start|>assistant\n`, ready for the model's answer.
    """
    start, end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    ids: list[int] = []
    for role, content in messages:
        ids += [start, *tok.encode(role + "\n"), *tok.encode(content), end, *tok.encode("\n")]
    if add_generation_prompt:
        ids += [start, *tok.encode("assistant\n")]
    return ids


class ByteTokenizer:
    """Bytes 0-255 map to ids 0-255; Qwen3's chat special tokens follow at 256.

    Deterministic and dependency-free, so synthetic models tokenize identically on every machine.
    `encode` is exactly the text's UTF-8 bytes (specials never come out of it).
    """

    name = "kvnet-byte-v2"

    def __init__(self) -> None:
        self.special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_by_id = {v: k for k, v in self.special.items()}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.pad_token_id = self.special["<|endoftext|>"]
        self.eos_token_id = self.special["<|im_end|>"]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def special_id(self, name: str) -> int:
        """The id of a special token, for code that builds chat prompts."""
        if name not in self.special:
            raise InputError(f"{name!r} is not a special token of {self.name}")
        return self.special[name]

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

    def identity_map(self) -> dict[str, object]:
        """The exact map whose canonical BLAKE3 is this tokenizer's identity (docs/artifact.md)."""
        return {"name": self.name, "special": list(SPECIAL_TOKENS)}

    def identity(self) -> bytes:
        return b3(canonical.encode(self.identity_map()))


# Files whose bytes define a Hugging Face tokenizer's behaviour.
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
)
_HF_TOKENIZER_FILES = HF_TOKENIZER_FILES  # the old name, kept for importers
HF_IDENTITY_NAME = "kvnet-hf-v2"


class HFTokenizer:
    """A tokenizer loaded from a local model folder; never downloads.

    Text is encoded with `add_special_tokens=False` (no BOS/EOS added) and `split_special_tokens=True`
    (special-token strings in the text are split as ordinary text), the same rule as ByteTokenizer.
    """

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
        return list(self.tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def special_id(self, name: str) -> int:
        """The id of one of the tokenizer's special (added) tokens."""
        specials = {str(t): i for t, i in zip(self.tok.all_special_tokens, self.tok.all_special_ids, strict=True)}
        added = {str(t): int(i) for t, i in self.tok.get_added_vocab().items()}
        found = specials.get(name, added.get(name))
        if found is None:
            raise InputError(f"{name!r} is not a special token of the tokenizer in {self.folder}")
        return int(found)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def identity_map(self) -> dict[str, object]:
        """The exact map whose canonical BLAKE3 is this tokenizer's identity (docs/artifact.md)."""
        files = {}
        for name in HF_TOKENIZER_FILES:
            path = self.folder / name
            if path.is_file():
                files[name] = b3(path.read_bytes())
        return {"name": HF_IDENTITY_NAME, "files": files}

    def identity(self) -> bytes:
        return b3(canonical.encode(self.identity_map()))
