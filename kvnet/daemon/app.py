"""The agent socket's routes (Starlette): OpenAI-compatible generation plus kvnet's own endpoints.

Every handler runs inside `_endpoint`, which turns every failure into a JSON error in the OpenAI
shape (4xx for the agent's mistakes, 503 for a full queue, 500 for a bug, logged) and counts the
request in the metrics: nothing an agent sends can stop the node. A stream that fails after it
started sends one `data: {"error": ...}` event and then `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvnet.daemon import openai_api as oa
from kvnet.daemon.chat import chat_tokens, document_prefix, message_text
from kvnet.daemon.config import LIMIT_FIELDS
from kvnet.daemon.scheduler import QueueFull
from kvnet.daemon.service import Run, Service
from kvnet.errors import InputError, KvnetError
from kvnet.ledger import SpendingLimitError
from kvnet.manifest import Terms

log = logging.getLogger("kvnet.daemon.app")
Handler = Callable[[Request], Awaitable[Response]]
# Request limits beyond `agent.max_body_bytes` (docs/security.md, "The agent socket"): a body within the
# byte limit must still not cost the node unbounded work or echo unbounded data back.
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a request body
MAX_TITLE_CHARS = 1024  # a published title goes into the signed manifest (and its DHT record)
MAX_IGNORED_PARAMS = 64  # unknown or non-default fields of one request (each is echoed in a header)


def error_response(err: oa.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_json(request: Request, max_bytes: int, timeout_s: float = 30.0) -> Any:
    """The request's JSON body: at most `max_bytes` (413), all of it within `timeout_s` of the call,
    which every handler makes first, as soon as the head is in (else 408; Hypercorn then closes the
    connection, as the body is incomplete). A body that trickles or stalls costs one connection for
    that long, never a queue slot: generations join the queue only after their body is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise oa.ApiError(413, f"request body over {max_bytes} bytes", code="body_too_large")
    body = bytearray()
    with trio.move_on_after(timeout_s) as deadline:
        try:
            async for part in request.stream():
                body += part
                if len(body) > max_bytes:
                    raise oa.ApiError(413, f"request body over {max_bytes} bytes", code="body_too_large")
        except ClientDisconnect:  # nobody reads the answer; counted as 499, not logged as a 500 with its trace
            raise oa.ApiError(499, "the client went away before its body was complete",
                              code="client_disconnected") from None
    if deadline.cancelled_caught:
        raise oa.ApiError(408, f"the request body did not arrive within {timeout_s:g} s (agent.body_timeout_s)",
                          code="body_timeout")
    try:
        value = json.loads(body)
    except RecursionError:
        value = None
        _too_deep()
    except (ValueError, UnicodeDecodeError) as exc:
        raise oa.bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    _check_depth(value)
    return value


def _too_deep() -> None:
    raise oa.bad(f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep", code="invalid_json")


def _check_depth(value: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (iteratively: no recursion on what an agent sent)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_JSON_DEPTH:
                _too_deep()
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def build_app(svc: Service) -> Starlette:
    max_body, body_timeout = svc.cfg.agent.max_body_bytes, svc.cfg.agent.body_timeout_s

    def endpoint(name: str, fn: Callable[[Request], Awaitable[Any]]) -> Handler:
        async def handler(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                result = await fn(request)
                resp = result if isinstance(result, Response) else JSONResponse(result)
            except oa.ApiError as exc:
                resp = error_response(exc)
            except InputError as exc:
                resp = error_response(oa.bad(str(exc)))
            except SpendingLimitError as exc:  # refused before any byte moved (docs/agent-api.md, "Payments")
                field = LIMIT_FIELDS.get(exc.limit, exc.limit)
                resp = error_response(oa.ApiError(402, f"{exc} (node.toml [prices] {field}); nothing was fetched",
                                                  "payment_required", code="spending_limit"))
            except QueueFull as exc:
                resp = error_response(oa.ApiError(503, str(exc), "server_error", code="queue_full"))
            except KvnetError as exc:  # ValueError kinds (manifest, engine) are the request's fault
                resp = error_response(oa.ApiError(400, str(exc)) if isinstance(exc, ValueError)
                                      else oa.ApiError(502, str(exc), "server_error"))
            except Exception:  # noqa: BLE001 - a bug answers 500; the node goes on
                log.exception("%s failed", name)
                resp = error_response(oa.ApiError(500, "internal error (logged by the node)", "server_error"))
            svc.metrics.requests.labels(name, str(resp.status_code)).inc()
            svc.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return resp
        return handler

    async def body_of(request: Request) -> dict[str, Any]:
        body = await read_json(request, max_body, body_timeout)
        if not isinstance(body, dict):
            raise oa.bad("the request body must be a JSON object")
        return body

    # -- OpenAI-compatible ----------------------------------------------------------------------

    async def generate(request: Request, chat: bool) -> Response:
        body = await body_of(request)
        params = oa.parse_params(body, svc.models, svc.cfg.agent.max_tokens, chat)
        if len(params.ignored) > MAX_IGNORED_PARAMS:
            raise oa.bad(f"{len(params.ignored)} unknown or non-default fields; at most {MAX_IGNORED_PARAMS}")
        tok = svc.engine.tokenizer
        try:
            prompt = chat_tokens(tok, body.get("messages")) if chat else oa.prompt_of(body, tok.encode)
        except InputError as exc:
            raise oa.bad(str(exc), "messages" if chat else "prompt") from None
        run = await svc.start(prompt, params)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        headers = {"x-kvnet-ignored-params": ",".join(params.ignored)} if params.ignored else None
        miss_doc = _system_doc(body) if chat and svc.cfg.agent.publish_on_miss and not run.reuse.cached else None
        if params.stream:
            return StreamingResponse(_stream(run, rid, params, chat, miss_doc), media_type="text/event-stream",
                                     headers=headers)
        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(_cancel_on_disconnect, request, run)
                async for _ in run.job.receive:
                    pass
                watch.cancel_scope.cancel()
        finally:
            run.job.cancel()
        if run.job.error is not None:
            raise run.job.error
        if run.job.gone:
            return Response(status_code=499)  # nobody reads it; counted as such in the metrics
        return JSONResponse(_final(run, rid, params, chat, miss_doc), headers=headers)

    async def _cancel_on_disconnect(request: Request, run: Run) -> None:
        """A non-streaming client that goes away frees its queue slot too (at its generation's next turn)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                run.job.gone = True
                run.job.cancelled = True
                return

    def _system_doc(body: dict) -> str | None:
        msgs = body.get("messages") or []
        if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") in ("system", "developer"):
            return message_text(0, msgs[0])[1]
        return None

    def _final(run: Run, rid: str, params: oa.GenParams, chat: bool, miss_doc: str | None) -> dict[str, Any]:
        svc.finished(run)
        if miss_doc and svc.nursery is not None:
            svc.nursery.start_soon(svc.publish_document_prefix, miss_doc)
        use = oa.usage(run.prompt_tokens, len(run.gen.tokens), run.reuse.cached)
        kv = svc.kvnet_info(run, params.ignored)
        text = svc.text_of(run.gen.tokens)
        shape = oa.chat_body if chat else oa.completion_body
        return shape(rid, params.model, text, run.gen.finish, use, kv)

    async def _stream(run: Run, rid: str, params: oa.GenParams, chat: bool,
                      miss_doc: str | None) -> AsyncIterator[str]:
        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        sent, first = "", True
        eos = svc.engine.tokenizer.eos_token_id
        tokens: list[int] = []
        try:
            async for new in run.job.receive:
                tokens += [t for t in new if t != eos]
                text = svc.engine.tokenizer.decode(tokens)
                if text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for the rest
                    continue
                if text[len(sent):] or first:
                    yield event(oa.chunk(rid, params.model, chat, text[len(sent):], None, first=first))
                    sent, first = text, False
            if run.job.error is not None:
                raise run.job.error
            body = _final(run, rid, params, chat, miss_doc)
            rest = svc.text_of(run.gen.tokens)[len(sent):]
            yield event(oa.chunk(rid, params.model, chat, rest, run.gen.finish, first=first,
                                 kv=body["kvnet"], use=body["usage"] if not params.include_usage else None))
            if params.include_usage:
                yield event(oa.chunk(rid, params.model, chat, None, None, use=body["usage"]))
        except Exception as exc:  # noqa: BLE001 - the headers are out: report in the stream
            log.exception("stream failed")
            yield event({"error": {"message": str(exc) or type(exc).__name__, "type": "server_error",
                                   "param": None, "code": None}})
        finally:
            run.job.cancel()  # a client that went away frees its queue slot at the next turn
        yield "data: [DONE]\n\n"

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": int(svc.started), "owned_by": "kvnet",
             "kvnet": {"model_id": svc.engine.model_id.hex(), "dtype": svc.cfg.model.dtype,
                       "context_tokens": svc.context_len}} for m in svc.models]}

    # -- kvnet ------------------------------------------------------------------------------------

    def tokens_of(body: dict[str, Any], for_chat_field: bool = False) -> list[int]:
        """`text` | `tokens` | `prompt` | `messages`: the token ids a kvnet endpoint is about, each a
        token of the model, and no more than its context holds (as for a generation request)."""
        tokens = _tokens_of(body, for_chat_field)
        vocab = int(svc.engine.model.config.vocab_size)
        if any(not 0 <= t < vocab for t in tokens):
            raise oa.bad(f"token ids must be in [0, {vocab})", "tokens")
        if len(tokens) > svc.context_len:
            raise oa.bad(f"{len(tokens)} tokens; this model's context is {svc.context_len}",
                         code="context_length_exceeded")
        return tokens

    def _tokens_of(body: dict[str, Any], for_chat_field: bool) -> list[int]:
        tok = svc.engine.tokenizer
        given = [k for k in ("text", "tokens", "prompt", "messages") if body.get(k) is not None]
        if len(given) != 1:
            raise oa.bad("give exactly one of text, tokens, prompt or messages")
        k = given[0]
        if k == "messages":
            return chat_tokens(tok, body["messages"])
        if k == "tokens":
            t = body["tokens"]
            if not (isinstance(t, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in t)):
                raise oa.bad("tokens must be a list of token ids", "tokens")
            return t
        text = body[k]
        if not isinstance(text, str):
            raise oa.bad(f"{k} must be a string", k)
        if for_chat_field and body.get("for_chat"):
            return document_prefix(tok, text)
        return tok.encode(text)

    async def publish(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        for_chat = body.get("for_chat", False)
        if not isinstance(for_chat, bool):
            raise oa.bad("for_chat must be true or false", "for_chat")
        if for_chat and body.get("text") is None:
            raise oa.bad("for_chat needs the document as text", "for_chat")
        tokens = tokens_of(body, for_chat_field=True)
        title = body.get("title")
        if title is not None and not (isinstance(title, str) and len(title) <= MAX_TITLE_CHARS):
            raise oa.bad(f"title must be a string of at most {MAX_TITLE_CHARS} characters", "title")
        price = body.get("price_per_load", 0)
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise oa.bad("price_per_load must be an integer >= 0 (micro-units)", "price_per_load")
        currency = body.get("currency", svc.cfg.prices.currency)
        if not isinstance(currency, str) or not 0 < len(currency) <= 16:
            raise oa.bad("currency must be 1 to 16 characters", "currency")
        ttl = body.get("ttl_seconds", 0)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
            raise oa.bad("ttl_seconds must be an integer >= 0", "ttl_seconds")
        out = await svc.publish(tokens, title=title, terms=Terms(price, currency), ttl=ttl)
        return {**out, "for_chat": for_chat}

    async def lookup(request: Request) -> dict[str, Any]:
        return await svc.lookup(tokens_of(await body_of(request)))

    async def fetch(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        mid = body.pop("manifest_id", None)
        if mid is not None:
            try:
                raw = bytes.fromhex(mid) if isinstance(mid, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise oa.bad("manifest_id must be 64 hex digits", "manifest_id")
            return await svc.fetch(manifest_id=raw, prompt=None)
        return await svc.fetch(manifest_id=None, prompt=tokens_of(body))

    async def status(request: Request) -> dict[str, Any]:
        return await svc.status()

    async def peers(request: Request) -> dict[str, Any]:
        return {"peers": svc.peers()}

    async def kv(request: Request) -> dict[str, Any]:
        return {"artifacts": await svc.entries()}

    async def ledger(request: Request) -> dict[str, Any]:
        """The node's ledger, as `kvnet ledger --json` prints it (kvnet.ledger.Ledger.report)."""
        report = await trio.to_thread.run_sync(svc.node.ledger.report)
        return {"me": svc.node.ledger.me.hex() if svc.node.ledger.me else None,
                "currency": svc.cfg.prices.currency, **report}

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        msg = "no such endpoint" if code == 404 else "method not allowed" if code == 405 else "bad request"
        return error_response(oa.ApiError(code, f"{msg}: {request.method} {request.url.path}"))

    routes = [
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", chat_completions), methods=["POST"]),
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/v1/kv/publish", endpoint("kv_publish", publish), methods=["POST"]),
        Route("/v1/kv/lookup", endpoint("kv_lookup", lookup), methods=["POST"]),
        Route("/v1/kv/fetch", endpoint("kv_fetch", fetch), methods=["POST"]),
        Route("/v1/kv", endpoint("kv", kv), methods=["GET"]),
        Route("/v1/status", endpoint("status", status), methods=["GET"]),
        Route("/v1/peers", endpoint("peers", peers), methods=["GET"]),
        Route("/v1/ledger", endpoint("ledger", ledger), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


class BearerAuth:
    """ASGI wrapper for the loopback TCP listener: every request needs `Authorization: Bearer <token>`
    (the Unix socket needs none: its mode 0600 already limits it to the node's user)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            import hmac

            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                resp = error_response(oa.ApiError(401, "missing or wrong bearer token", "authentication_error",
                                                  code="invalid_api_key"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
