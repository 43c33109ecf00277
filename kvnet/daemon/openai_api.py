"""The OpenAI-compatible surface: request checks, the error shape, response and stream-chunk shapes.

Decoding is greedy, always. Sampling parameters with their no-op value (temperature 0, top_p 1,
penalties 0, n 1, ...) are honoured as such; any other value, and any field this node does not know,
is accepted but not applied, and listed in the response's `kvnet.ignored_params` (and the
`x-kvnet-ignored-params` header), so nothing is silently mis-applied. `n` > 1 is refused (400).
Pure functions, no I/O: docs/agent-api.md is their spec.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvnet.errors import KvnetError

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's legacy completions default


class ApiError(KvnetError):
    """A request the agent socket refuses: HTTP status + the OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# value that means "no effect" for each sampling field: any other value is reported as ignored
NO_OP: dict[str, tuple[Any, ...]] = {
    "temperature": (None, 0, 0.0), "top_p": (None, 1, 1.0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "stop": (None, [], ""), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none", "auto"), "response_format": (None,),
    "functions": (None, []), "function_call": (None, "none", "auto"), "top_k": (None, 0, -1),
    "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0), "parallel_tool_calls": (None, True, False),
}
NUMERIC = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
# fields with no effect on a greedy answer, so nothing to report (seed: greedy is deterministic anyway)
HARMLESS = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "user", "seed",
            "metadata", "store", "ignore_eos", "prompt", "messages", "service_tier", "kvnet_reuse"}


@dataclass
class GenParams:
    model: str
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    ignored: list[str] = field(default_factory=list)
    chat: bool = False
    reuse: bool = True  # kvnet_reuse: false prefills the whole prompt (baselines, exactness checks)


def _int_field(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer", name)
    if not lo <= v <= hi:
        raise bad(f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def parse_params(body: Any, models: tuple[str, ...], max_tokens: int, chat: bool) -> GenParams:
    """Check the fields every generation request shares; raise ApiError with the OpenAI error shape."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model")
    if model not in models:
        raise ApiError(404, f"the model {model!r} does not exist on this node (it serves {', '.join(models)})",
                       param="model", code="model_not_found")
    for name in NUMERIC:
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise bad(f"{name} must be a number", name)
    n = _int_field(body, "n", 1, 128)
    if n is not None and n != 1:
        raise bad("n > 1 is not supported: this node decodes greedily, so every choice would be the same", "n")
    limit = _int_field(body, "max_tokens", 1, 1 << 30)
    if chat:
        limit = _int_field(body, "max_completion_tokens", 1, 1 << 30) or limit
    if limit is not None and limit > max_tokens:
        raise bad(f"max_tokens is {limit}, more than this node allows per request ({max_tokens})", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    ignore_eos, reuse = body.get("ignore_eos", False), body.get("kvnet_reuse", True)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    if not isinstance(reuse, bool):
        raise bad("kvnet_reuse must be true or false", "kvnet_reuse")
    ignored = sorted(k for k, v in body.items()
                     if k not in HARMLESS and (k not in NO_OP or v not in NO_OP[k]))
    default = max_tokens if chat else min(DEFAULT_COMPLETION_TOKENS, max_tokens)
    return GenParams(model, limit or default, bool(stream), bool(opts.get("include_usage")), ignore_eos, ignored,
                     chat, reuse)


def prompt_of(body: dict, encode) -> list[int]:
    """The tokens of a completions `prompt`: a string, a list of token ids, or a one-element list of either."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    if isinstance(p, str):
        return encode(p)
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return list(p)
    if isinstance(p, list):
        raise bad("batched prompts are not supported: send one prompt per request", "prompt")
    raise bad("prompt must be a string or a list of token ids", "prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_body(rid: str, model: str, text: str, finish: str, use: dict, kv: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use, "kvnet": kv}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict, kv: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use, "kvnet": kv}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, *, first: bool = False,
          use: dict | None = None, kv: dict | None = None) -> dict[str, Any]:
    """One stream event. `text` None with `use`: the final usage-only chunk (choices empty)."""
    obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": int(time.time()), "model": model}
    if text is None and use is not None:
        obj["choices"] = []
    elif chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        obj["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if use is not None:
        obj["usage"] = use
    if kv is not None:
        obj["kvnet"] = kv
    return obj
