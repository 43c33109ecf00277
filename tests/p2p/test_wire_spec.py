"""docs/protocol.md and the code agree: every error code the spec lists is one the server may send
(and no other), and every limit in the spec's table is the constant the code enforces."""

from __future__ import annotations

import re

from kvnet.p2p import compat, server, wire
from tests.artifacts import ROOT

SPEC = (ROOT / "docs" / "protocol.md").read_text()


def _first_table(heading: str) -> list[list[str]]:
    section = SPEC.split(heading, 1)[1].lstrip("\n")
    lines = []
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_documented_error_codes_are_exactly_the_sendable_ones():
    codes = {row[0].strip("`") for row in _first_table("### Errors")}
    assert codes == wire.ERROR_CODES


def test_documented_limits_are_the_enforced_ones():
    limits = {row[0]: row[1] for row in _first_table("### Limits")}

    def value(name: str) -> int:
        m = re.search(r"\(([\d,]+) bytes\)", limits[name]) or re.match(r"(\d+)", limits[name])
        return int(m.group(1).replace(",", ""))

    assert value("request frame (payload after the 4-byte length)") == wire.MAX_REQUEST
    assert value("response frame") == wire.MAX_RESPONSE
    assert value("ranges per `pieces` request") == server.MAX_RANGES
    assert value("pieces per `pieces` request (all ranges together)") == server.MAX_PIECES_PER_REQUEST
    assert value("offers per `offer` response") == server.MAX_OFFERS
    assert value("yamux initial window, each direction") == compat.YAMUX_SPEC_WINDOW
    assert value("yamux window a kvnet receiver grants per stream") == compat.YAMUX_RECEIVE_WINDOW
    assert "10 s by default" in limits["server: time from stream open to a complete request frame"]
    assert server.REQUEST_TIMEOUT == 10.0
    delta = compat.YAMUX_RECEIVE_WINDOW - compat.YAMUX_SPEC_WINDOW
    assert f"delta {delta:,}" in SPEC


def test_dht_limits_are_the_enforced_ones():
    from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, MAX_PROVIDERS_PER_MSG

    from kvnet.p2p import dht_limits as lim
    from kvnet.p2p.dht import PROVIDER_RATE_MAX

    assert f"| message length (the varint prefix) | 4 MiB ({MAX_DHT_MESSAGE_SIZE:,} bytes)" in SPEC
    assert f"| request message, except `PUT_VALUE` | 16 KiB ({lim.DHT_REQUEST_MAX_BYTES:,} bytes) |" in SPEC
    assert (f"| `PUT_VALUE` message | 208 KiB ({lim.PUT_VALUE_MAX_BYTES:,} bytes); a manifest record at most "
            f"192 KiB ({lim.MANIFEST_RECORD_MAX_BYTES:,} bytes) |") in SPEC
    assert f"| `ADD_PROVIDER` / `GET_PROVIDERS` key | exactly {lim.PROVIDER_KEY_BYTES} bytes |" in SPEC
    assert f"| `GET_VALUE` / `PUT_VALUE` key | exactly {lim.MANIFEST_KEY_BYTES} bytes" in SPEC
    assert (f"| addresses kept per provider entry | {lim.PROVIDER_ADDRS_MAX}, each at most "
            f"{lim.PROVIDER_ADDR_MAX_BYTES} bytes |") in SPEC
    assert f"| `ADD_PROVIDER` messages from one peer | {PROVIDER_RATE_MAX} per 10 seconds" in SPEC
    assert f"| provider peers in one `ADD_PROVIDER` | {MAX_PROVIDERS_PER_MSG} " in SPEC
    assert (f"| time to send the request / whole stream | {lim.DHT_REQUEST_TIMEOUT_S:g} seconds / "
            f"{lim.DHT_STREAM_TIMEOUT_S:g} seconds |") in SPEC
    assert (f"| DHT requests handled at once | {lim.DHT_HANDLERS_MAX} in total, {lim.DHT_STREAMS_PER_PEER} per "
            f"peer (up to {lim.DHT_QUEUED_PER_PEER} more") in SPEC


def test_dht_field_numbers_are_the_protobuf_schema():
    from libp2p.kad_dht.pb import kademlia_pb2 as pb

    for msg in (pb.Message, pb.Message.Peer, pb.Record):
        for f in msg.DESCRIPTOR.fields:
            assert re.search(rf"\b{f.name} = {f.number};", SPEC), (msg.DESCRIPTOR.name, f.name)
    for enum in (pb.Message.MessageType, pb.Message.ConnectionType):
        for v in enum.DESCRIPTOR.values:
            assert f"{v.name} = {v.number};" in SPEC


def test_bulk_limits_and_layout_are_the_enforced_ones():
    from kvnet.p2p import bulk_wire as bw
    from kvnet.p2p.bulk_server import BulkServer

    limits = {row[0]: row[1] for row in _first_table("### Limits of the bulk listener")}
    d = bw.BulkLimits()
    assert limits["token"].startswith(f"{bw.TOKEN_BYTES} bytes ({bw.TOKEN_BYTES * 8} bits)")
    assert limits["token lifetime (`ttl`)"] == f"{d.token_ttl_s:g} s from issue"
    assert limits["grants issued and not yet redeemed or expired"].startswith(
        f"{d.grants_per_peer} per peer, {d.grants_total} in total")
    assert limits["bulk connections at once, in total (with or without a token yet)"].startswith(f"{d.conns_total};")
    assert limits["bulk connections at once per peer (counted from its first token)"].startswith(
        f"{d.conns_per_peer};")
    assert limits["from accept to a complete token message (TLS handshake included)"] == f"{d.hello_s:g} s"
    assert limits["from a grant's end record to the next token message"] == f"{d.idle_s:g} s"
    assert limits["time for one record (header + piece) to be accepted by the peer"] == f"{d.stall_s:g} s"
    assert f"({bw.MAX_ERROR_RECORD:,} bytes)" in limits["error record payload"]
    assert f"# seconds the token stays valid: {d.token_ttl_s:g}" in SPEC
    # the byte layout: a 12-byte header, the kinds' numbers, the token message
    assert bw.HEADER.size == 12 and "**Record header**: 12 bytes, big-endian" in SPEC
    kinds = set(re.findall(r"^\| (\d) (piece|missing|end|error) \|", SPEC, re.M))
    assert kinds == {(str(bw.KIND_PIECE), "piece"), (str(bw.KIND_MISSING), "missing"), (str(bw.KIND_END), "end"),
                     (str(bw.KIND_ERROR), "error")}
    assert "| 0 | 1 | kind: 0 piece, 1 missing, 2 end, 3 error |" in SPEC
    assert bw.header(bw.KIND_END, 7, 0) == bytes([2, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0])
    assert bw.hello(bytes(range(16)))[:4] == bytes([0x6B, 0x76, 0x62, 0x31]) and bw.HELLO_BYTES == 20
    assert "20 bytes, the ASCII `kvb1` (0x6b 0x76 0x62 0x31) then the\n   16-byte token" in SPEC
    assert {"v", "manifest", "ranges", "mode", "receipt"} == bw.BULK_FIELDS and bw.DEFAULT_MODE == "tls"
    assert BulkServer.__init__.__defaults__[0] == 0  # port 0 (a free port) by default
