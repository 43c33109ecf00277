"""`kvnet.client.Client`: a small synchronous client of a running kvnet-node's agent socket.

httpx over the Unix socket (the same transport an agent gives the official `openai` client). Every
endpoint of docs/agent-api.md has a method returning the decoded JSON; an error answer raises
`NodeError` with the node's own message and HTTP status, and a node that is not running raises
`NodeUnreachable`, naming the socket path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from kvnet.errors import KvnetError

__all__ = ["Client", "NodeError", "NodeUnreachable"]
BASE_URL = "http://kvnet-node"


class NodeUnreachable(KvnetError):
    """No kvnet-node answers on the socket (not started, stopped, or another path)."""


class NodeError(KvnetError):
    """The node answered with an error (its message, HTTP status and OpenAI error type)."""

    def __init__(self, status: int, message: str, type_: str | None = None, code: str | None = None) -> None:
        super().__init__(f"node answered {status}: {message}")
        self.status, self.message, self.type, self.code = status, message, type_, code


class Client:
    def __init__(self, socket_path: str | Path, timeout: float = 600.0) -> None:
        self.socket_path = Path(socket_path)
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url=BASE_URL,
                                 timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _check(self, resp: httpx.Response) -> Any:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
            raise NodeError(resp.status_code, err.get("message") or resp.text[:200], err.get("type"), err.get("code"))
        return body

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self.http.request(method, path, json=body)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise NodeUnreachable(f"no kvnet-node answers on {self.socket_path} ({exc}); is it running?") from exc
        return self._check(resp)

    # -- kvnet endpoints ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def peers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/peers")["peers"]

    def kv(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/kv")["artifacts"]

    def ledger(self) -> dict[str, Any]:
        """Balances per peer, publisher and manifest, the latest receipt per channel, debtors."""
        return self.request("GET", "/v1/ledger")

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models")["data"]

    def publish(self, text: str, *, title: str | None = None, for_chat: bool = False, price_per_load: int = 0,
                currency: str | None = None, ttl_seconds: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "title": title, "for_chat": for_chat, "price_per_load": price_per_load,
                                "ttl_seconds": ttl_seconds}
        if currency is not None:
            body["currency"] = currency
        return self.request("POST", "/v1/kv/publish", body)

    def lookup(self, **what: Any) -> dict[str, Any]:
        """One of text=, tokens=, prompt= or messages=."""
        return self.request("POST", "/v1/kv/lookup", what)

    def fetch(self, manifest_id: str | None = None, **what: Any) -> dict[str, Any]:
        body = {"manifest_id": manifest_id} if manifest_id else what
        return self.request("POST", "/v1/kv/fetch", body)

    # -- generation -----------------------------------------------------------------------------

    def default_model(self) -> str:
        return self.models()[0]["id"]

    def chat(self, messages: list[dict[str, Any]], *, model: str | None = None, max_tokens: int | None = None,
             **extra: Any) -> dict[str, Any]:
        body = {"model": model or self.default_model(), "messages": messages, **extra}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return self.request("POST", "/v1/chat/completions", body)

    def complete(self, prompt: str | list[int], *, model: str | None = None, max_tokens: int = 16,
                 **extra: Any) -> dict[str, Any]:
        body = {"model": model or self.default_model(), "prompt": prompt, "max_tokens": max_tokens, **extra}
        return self.request("POST", "/v1/completions", body)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of a streaming request (decoded JSON), up to `data: [DONE]`."""
        try:
            with self.http.stream("POST", path, json={**body, "stream": True}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.ConnectError as exc:
            raise NodeUnreachable(f"no kvnet-node answers on {self.socket_path} ({exc}); is it running?") from exc
