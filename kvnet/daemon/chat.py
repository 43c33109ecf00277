"""Chat prompts, and documents published for chat.

A chat request is tokenized with the model's chat format (`kvnet.tokenizer.encode_chat`): each message
is `<|im_start|>role\\n content <|im_end|>\\n`, then `<|im_start|>assistant\\n`. The tokens of a
conversation that starts with a system message holding document D therefore begin with exactly
`document_prefix(D)`: the system turn alone, closed, without the generation prompt. A document
published `for_chat` is published as those tokens, so any chat request whose first message is that
system message reuses the document's KV, whatever follows it.
"""

from __future__ import annotations

from typing import Any

from kvnet.errors import InputError
from kvnet.tokenizer import Tokenizer, encode_chat

ROLES = ("system", "user", "assistant", "developer", "tool")


def message_text(i: int, msg: Any) -> tuple[str, str]:
    """(role, text) of one OpenAI chat message; content may be a string or a list of text parts.

    "developer" (OpenAI's newer name for system) is mapped to "system", so both shapes reuse the same KV.
    """
    if not isinstance(msg, dict):
        raise InputError(f"messages[{i}] must be an object with role and content")
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InputError(f"messages[{i}].content[{j}] must be a text part {{type: text, text: ...}} "
                                 "(this node serves a text-only model)")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise InputError(f"messages[{i}].content must be a string or a list of text parts")
    return ("system" if role == "developer" else role), content


def chat_tokens(tok: Tokenizer, messages: Any) -> list[int]:
    """The prompt tokens of an OpenAI `messages` list, ending with the assistant's generation prompt."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    return encode_chat(tok, [message_text(i, m) for i, m in enumerate(messages)], add_generation_prompt=True)


def document_prefix(tok: Tokenizer, text: str) -> list[int]:
    """The tokens a document is published as `for_chat`: a closed system turn holding it."""
    return encode_chat(tok, [("system", text)], add_generation_prompt=False)
