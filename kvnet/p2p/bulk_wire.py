"""The bulk path's messages and byte layout (docs/protocol.md, "/kvnet/bulk/1.0.0").

libp2p stays the control plane: a `/kvnet/bulk/1.0.0` request on a Noise-authenticated stream asks
for pieces and gets back where to fetch them (host, port), a single-use token, and the SHA-256
fingerprint of the provider's TLS certificate. Because that answer comes over Noise from the
provider's peer id, the pinned certificate authenticates the bulk server as that peer. The piece
bytes then travel on a plain TCP connection (TLS 1.3 by default), where Python's `ssl` and blocking
socket I/O in threads move about 4x what a py-libp2p stream can.

Integrity never depends on the channel: every piece is checked against the signed manifest.
"""

from __future__ import annotations

import ctypes
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from kvnet.errors import KvnetError

BULK_PROTOCOL = "/kvnet/bulk/1.0.0"
# The fields a v1 bulk request may carry (anything else is `malformed`, as for `pieces`).
BULK_FIELDS = frozenset({"v", "manifest", "ranges", "mode", "receipt"})
MODE_TLS = "tls"
MODE_TCP = "tcp"
MODES = frozenset({MODE_TLS, MODE_TCP})
DEFAULT_MODE = MODE_TLS

TOKEN_BYTES = 16  # 128 random bits from `secrets`
FINGERPRINT_BYTES = 32  # SHA-256 of the certificate's DER bytes
MAGIC = b"kvb1"  # starts every token message; its first byte (0x6b) can never start a TLS record (0x16)
TLS_RECORD_HANDSHAKE = 0x16
HELLO_BYTES = len(MAGIC) + TOKEN_BYTES  # 20

# A record header: kind (u8), 3 reserved zero bytes, piece index (u32), length (u32), big-endian.
HEADER = struct.Struct(">B3sII")
KIND_PIECE = 0  # `length` bytes of piece `index` follow
KIND_MISSING = 1  # this provider does not have piece `index` after all; length 0
KIND_END = 2  # the grant is complete; index = number of records before it, length 0
KIND_ERROR = 3  # `length` bytes of a canonical msgpack error map follow (docs/protocol.md, "Errors")
KINDS = frozenset({KIND_PIECE, KIND_MISSING, KIND_END, KIND_ERROR})
RESERVED = b"\0\0\0"
MAX_ERROR_RECORD = 16 * 1024
# TLS 1.3 cipher suites in the order a bulk server prefers them. AES-128-GCM first: on this machine
# (AES-NI, VAES) OpenSSL seals 16 KiB records at ~3.1-3.3 GB/s with it against ~1.3-1.9 GB/s with
# AES-256-GCM, which OpenSSL's default order puts first. Every TLS 1.3 peer implements AES-128-GCM.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


@dataclass(frozen=True)
class BulkLimits:
    """What the bulk listener allows (docs/protocol.md, "/kvnet/bulk/1.0.0", Limits)."""

    conns_per_peer: int = 4  # concurrent bulk connections holding a redeemed token, per peer
    conns_total: int = 64  # concurrent bulk connections, with or without a token yet
    token_ttl_s: float = 30.0  # a token must be presented this soon after it was issued
    hello_s: float = 5.0  # time from accept to a complete token message (TLS handshake included)
    idle_s: float = 10.0  # time after a grant's end record to the next token message
    stall_s: float = 10.0  # time one record (header + piece) may take to be accepted by the peer
    grants_per_peer: int = 8  # tokens issued and not yet redeemed or expired, per peer
    grants_total: int = 1024  # the same, for all peers together


class BulkError(KvnetError):
    """A bulk transfer failed. `reason` says whose fault and how a fetcher treats the provider:
    `unavailable` (could not set up: fall back to libp2p streams), or a drop reason of the fetcher
    (`bad_piece`, `bad_length`, `protocol`, `timeout`, `refused`)."""

    def __init__(self, reason: str, msg: str) -> None:
        super().__init__(f"{reason}: {msg}")
        self.reason = reason


def hello(token: bytes) -> bytes:
    """The token message a client sends to redeem a grant."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a token is {TOKEN_BYTES} bytes")
    return MAGIC + token


def header(kind: int, index: int, length: int) -> bytes:
    return HEADER.pack(kind, RESERVED, index, length)


def parse_header(raw: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(kind, index, length) of a record header, or BulkError('protocol')."""
    kind, reserved, index, length = HEADER.unpack(raw)
    if kind not in KINDS or reserved != RESERVED:
        raise BulkError("protocol", f"bad record header (kind {kind}, reserved {reserved.hex()})")
    return kind, index, length


def prefer_aes128_gcm(ctx: ssl.SSLContext, suites: bytes = TLS13_SUITES) -> bool:
    """Set TLS 1.3 cipher `suites` (default TLS13_SUITES) on `ctx`. Python's `ssl` has no call for
    TLS 1.3 suites (`set_ciphers` is TLS 1.2 only), so this calls SSL_CTX_set_ciphersuites in the
    libssl that `_ssl` already loaded. The SSL_CTX pointer is read from the SSLContext object right
    after its object header, and used only if OpenSSL reports the same options for it as Python
    does; any mismatch or failure leaves the context as it was (returns False; connections then
    use OpenSSL's default order, which is only slower). tests/p2p/test_bulk.py pins the suite."""
    try:
        lib = ctypes.CDLL(_loaded_libssl())
        get_options, set_suites = lib.SSL_CTX_get_options, lib.SSL_CTX_set_ciphersuites
        get_options.argtypes, get_options.restype = [ctypes.c_void_p], ctypes.c_uint64
        set_suites.argtypes, set_suites.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or get_options(ptr) != ctx.options:
            return False
        return set_suites(ptr, suites) == 1
    except (OSError, AttributeError, ValueError):
        return False


def _loaded_libssl() -> str:
    """The path of the libssl mapped into this process (the one Python's `ssl` uses)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith("libssl.so"):
            return path
    raise OSError("no libssl mapped in this process")
