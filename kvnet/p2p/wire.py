"""Framing and message schemas shared by kvnet's stream protocols (specified in docs/protocol.md).

A frame is a 4-byte big-endian length followed by that many bytes of canonical msgpack. Piece data
follows its header frame as raw bytes (no msgpack wrapping, so the receiver copies it once). Every
read has a size limit and the caller puts a deadline around it.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from kvnet import canonical
from kvnet.errors import KvnetError

PROTOCOL_VERSION = 1
MAX_REQUEST = 16 * 1024
MAX_RESPONSE = 16 * 1024 * 1024

# The codes a server may put in an error frame (docs/protocol.md, "Errors"). WireError also carries
# the local-only codes "eof" and "reset" (how a read ended), which are never sent.
ERROR_CODES = frozenset({"too_large", "malformed", "bad_range", "unknown_manifest", "timeout", "internal",
                         "busy", "rate_limited", "payment_required", "debtor", "receipt_refused", "forbidden"})
# Of these, the codes that refuse a request for the peer's load rather than its content: the request
# may be fine later, so a client backs off from that provider instead of treating it as a liar.
LOAD_CODES = frozenset({"busy", "rate_limited"})


class WireError(KvnetError):
    """The peer sent something malformed, oversized or unexpected, or closed early."""

    def __init__(self, code: str, msg: str, **extra: Any) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.extra = extra  # more fields of the error frame (a refused receipt's `rule`, `seq`, `channel`)


class Stream(Protocol):
    """What kvnet needs of a stream (a libp2p INetStream satisfies it)."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


def _is_eof(exc: BaseException) -> bool:
    return type(exc).__name__ in {"StreamEOF", "EndOfChannel", "StreamClosed"}


def _is_reset(exc: BaseException) -> bool:
    return type(exc).__name__ in {"StreamReset", "MuxedStreamReset", "MuxedStreamError"}


async def read_exact(stream: Stream, n: int, into: bytearray | None = None) -> bytearray:
    """Read exactly n bytes; a peer that closes early raises WireError('eof')."""
    buf = into if into is not None else bytearray(n)
    got = 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except Exception as exc:
            if _is_eof(exc):
                raise WireError("eof", f"stream ended after {got} of {n} bytes") from exc
            if _is_reset(exc):
                raise WireError("reset", f"stream reset after {got} of {n} bytes") from exc
            raise
        if not chunk:
            raise WireError("eof", f"stream ended after {got} of {n} bytes")
        buf[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buf


async def read_frame(stream: Stream, limit: int) -> dict[str, Any]:
    """One length-prefixed canonical msgpack map, at most `limit` bytes."""
    (size,) = struct.unpack(">I", bytes(await read_exact(stream, 4)))
    if size > limit:
        raise WireError("too_large", f"frame of {size} bytes exceeds the limit of {limit}")
    raw = bytes(await read_exact(stream, size))
    try:
        msg = canonical.decode(raw, limit)
    except canonical.CanonicalError as exc:
        raise WireError("malformed", str(exc)) from exc
    if not isinstance(msg, dict):
        raise WireError("malformed", "a frame must hold a map")
    return msg


def frame(msg: dict[str, Any]) -> bytes:
    payload = canonical.encode(msg)
    return struct.pack(">I", len(payload)) + payload


async def write_frame(stream: Stream, msg: dict[str, Any]) -> None:
    await stream.write(frame(msg))


def error(code: str, msg: str, **extra: Any) -> dict[str, Any]:
    """An error frame; only documented codes may go on the wire."""
    if code not in ERROR_CODES:
        raise ValueError(f"undocumented error code {code!r}")
    return {"v": PROTOCOL_VERSION, "err": code, "msg": msg[:500], **extra}


def field(msg: dict[str, Any], name: str, typ: type, *, size: int | None = None) -> Any:
    """A required, typed field of a received message, or WireError('malformed')."""
    if name not in msg:
        raise WireError("malformed", f"missing field {name!r}")
    value = msg[name]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise WireError("malformed", f"field {name!r} must be {typ.__name__}")
    if size is not None and len(value) != size:
        raise WireError("malformed", f"field {name!r} must be {size} bytes")
    return value


def bitfield(indices: set[int], n: int) -> bytes:
    """Piece presence as bits, LSB first within each byte."""
    out = bytearray((n + 7) // 8)
    for i in indices:
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def from_bitfield(bits: bytes, n: int) -> set[int]:
    if len(bits) != (n + 7) // 8:
        raise WireError("malformed", f"bitfield of {len(bits)} bytes for {n} pieces")
    return {i for i in range(n) if bits[i >> 3] >> (i & 7) & 1}
