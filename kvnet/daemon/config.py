"""node.toml: every field of a kvnet-node, each with a default, checked with one clear line per mistake.

Why a table of fields instead of free-form dicts: an operator's typo (`qeue_size`) or a wrong type must
stop the node at start with a line that names the field, never be silently ignored. An empty file is
valid: every field has a default, and paths default to places under `data_dir`.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvnet.errors import KvnetError
from kvnet.ledger import SpendingLimits

DTYPES = ("bf16", "fp32", "fp16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_DATA_DIR = "~/.kvnet"
DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
DEFAULT_METRICS = "127.0.0.1:9464"
# Unix socket paths are limited to 107 bytes (sun_path) on Linux.
MAX_SOCKET_PATH = 107


class ConfigError(KvnetError, ValueError):
    """node.toml cannot be used: unreadable, not TOML, an unknown field, or a field with a bad value."""


@dataclass(frozen=True)
class ModelConfig:
    ref: str = "tiny"
    dtype: str = "bf16"


NO_LIMIT = -1  # a spending limit of -1 means none (TOML has no null)
DEFAULT_MAX_PER_DAY = 1_000_000  # 1.00 of the currency per day: a default budget, not an open purse


@dataclass(frozen=True)
class PricesConfig:
    """What this node charges for hosting and the most it pays when it fetches (docs/payments.md).
    Amounts are integer micro-units of `currency`; a limit of -1 is no limit."""

    currency: str = "USD"
    host_fee_per_mib: int = 0  # hosting fee per MiB served (0: serve for free)
    credit_window: int = 0  # what a payer may owe before it must pay (0: the cost of 64 MiB at the fee)
    max_per_load: int = NO_LIMIT  # highest license price per load to pay
    max_per_mib: int = NO_LIMIT  # highest hosting fee per MiB to pay
    max_per_peer_per_day: int = NO_LIMIT  # most paid to one peer in 24 h
    max_per_day: int = DEFAULT_MAX_PER_DAY  # most paid in total in 24 h

    def spending_limits(self) -> SpendingLimits:
        """The p2p layer's limits (None where this config says -1)."""
        def lim(v: int) -> int | None:
            return None if v == NO_LIMIT else v
        return SpendingLimits(self.currency, lim(self.max_per_load), lim(self.max_per_mib),
                              lim(self.max_per_peer_per_day), lim(self.max_per_day))

    @property
    def window(self) -> int | None:
        """The credit window for kvnet.p2p.node.Node (None: its default, the cost of 64 MiB)."""
        return self.credit_window or None


LIMITS = ("max_per_load", "max_per_mib", "max_per_peer_per_day", "max_per_day")
# kvnet.ledger.SpendingLimitError.limit -> the node.toml field that sets it
LIMIT_FIELDS = {"per_load": "max_per_load", "per_mib": "max_per_mib", "per_peer_per_day": "max_per_peer_per_day",
                "total_per_day": "max_per_day", "currency": "currency"}


@dataclass(frozen=True)
class AgentConfig:
    socket: str = ""  # default: <data_dir>/agent.sock
    tcp_port: int = 0  # 0: no TCP listener; else 127.0.0.1:<port>, bearer token required
    token: str = ""
    queue_size: int = 16  # generations queued or running at once; more get 503
    max_tokens: int = 512  # the most tokens one request may generate (its default: 256 or this, the smaller)
    chunk_tokens: int = 8  # tokens a generation runs before the next one in the queue gets the model
    max_body_bytes: int = 4 * 2**20
    # What one local client can hold (docs/security.md, "The agent socket"); each listener has its own.
    max_connections: int = 64  # connections open at once per listener (socket, TCP port); more get 503
    body_timeout_s: int = 30  # from a request's complete head to the end of its body; else 408, closed
    keep_alive_timeout_s: int = 30  # a connection with no request in progress (or a head still incomplete)
    send_timeout_s: int = 60  # one write to a client that does not read; then the connection is dropped
    use_network: bool = True  # look up and fetch longer prefixes from peers
    publish_on_miss: bool = False  # publish the document prefix of a chat request when nothing was found


TIMEOUTS = ("body_timeout_s", "keep_alive_timeout_s", "send_timeout_s")  # whole seconds, 1 to 3600


@dataclass(frozen=True)
class AuditConfig:
    """The audit policy (docs/audits.md): `blocks` random covered blocks plus the last one of every
    artifact on its first load, in the background."""

    enabled: bool = True
    blocks: int = 1


@dataclass(frozen=True)
class LogConfig:
    level: str = "warning"
    format: str = "text"


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path = Path(DEFAULT_DATA_DIR).expanduser()
    identity_key: Path | None = None  # default: <data_dir>/identity.key (created at first start)
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    bootstrap: tuple[str, ...] = ()
    store_capacity_mb: int = 0  # 0: unlimited
    metrics: str = DEFAULT_METRICS  # host:port on loopback; "" turns metrics off
    model: ModelConfig = field(default_factory=ModelConfig)
    prices: PricesConfig = field(default_factory=PricesConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    log: LogConfig = field(default_factory=LogConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def key_path(self) -> Path:
        return self.identity_key or self.data_dir / "identity.key"

    @property
    def socket_path(self) -> Path:
        return Path(self.agent.socket).expanduser() if self.agent.socket else self.data_dir / "agent.sock"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite"


# -- the checks --------------------------------------------------------------------------------------


def _want(name: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: must be {what}, got {value!r}")
    return value


def _int(name: str, value: Any, lo: int = 0, hi: int | None = None) -> int:
    _want(name, value, int, "an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{name}: must be {bound}, got {value}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    _want(name, value, str, "a string")
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _str_list(name: str, value: Any) -> tuple[str, ...]:
    _want(name, value, list, "a list of strings")
    for v in value:
        _want(name, v, str, "a list of strings")
    return tuple(value)


def _listen(value: Any) -> tuple[str, ...]:
    addrs = _str_list("listen", value)
    if not addrs:
        raise ConfigError("listen: needs at least one multiaddr (e.g. /ip4/0.0.0.0/tcp/4001)")
    for a in addrs:
        parts = a.split("/")
        if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            raise ConfigError(f"listen: {a!r} is not /ip4/<ip>/tcp/<port> (or /ip6/...)")
        try:
            ipaddress.ip_address(parts[2])
            ok = 0 <= int(parts[4]) <= 65535
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"listen: {a!r} is not /ip4/<ip>/tcp/<port> (or /ip6/...)")
    return addrs


def _bootstrap(value: Any) -> tuple[str, ...]:
    from kvnet.errors import BootstrapError
    from kvnet.p2p.node import validate_bootstrap

    addrs = _str_list("bootstrap", value)
    try:
        validate_bootstrap(list(addrs))
    except BootstrapError as exc:
        raise ConfigError(f"bootstrap: {exc}") from None
    return addrs


def _loopback(name: str, value: Any) -> str:
    """host:port with a loopback host (metrics must never face the network by default)."""
    _want(name, value, str, 'a "host:port" string')
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        ok = sep and ip.is_loopback and 0 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f'{name}: must be "host:port" on a loopback address (e.g. "127.0.0.1:9464"), '
                          f"got {value!r}")
    return value


def _table(name: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    _want(name, raw, dict, "a table")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        where = f"{name}." if name != "(top level)" else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {', '.join(sorted(allowed))})")
    return raw


def _path(name: str, value: Any, base: Path) -> Path:
    _want(name, value, str, "a path string")
    if not value:
        raise ConfigError(f"{name}: must not be empty")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _model(raw: Any) -> ModelConfig:
    t = _table("model", raw, {"ref", "dtype"})
    ref = _want("model.ref", t.get("ref", ModelConfig.ref), str, "a model ref string")
    if not ref:
        raise ConfigError("model.ref: must not be empty (tiny, qwen3-0.6b-shape, or a local HF folder)")
    return ModelConfig(ref, _choice("model.dtype", t.get("dtype", ModelConfig.dtype), DTYPES))


def _prices(raw: Any) -> PricesConfig:
    d = PricesConfig()
    t = _table("prices", raw, set(PricesConfig.__dataclass_fields__))
    cur = _want("prices.currency", t.get("currency", d.currency), str, "a string")
    if not 0 < len(cur) <= 16:
        raise ConfigError(f"prices.currency: must be 1 to 16 characters, got {cur!r}")
    fees = {k: _int(f"prices.{k}", t.get(k, getattr(d, k))) for k in ("host_fee_per_mib", "credit_window")}
    limits = {k: _int(f"prices.{k}", t.get(k, getattr(d, k)), NO_LIMIT) for k in LIMITS}
    return PricesConfig(cur, **fees, **limits)


def _agent(raw: Any, data_dir: Path) -> AgentConfig:
    d = AgentConfig()
    t = _table("agent", raw, set(AgentConfig.__dataclass_fields__))
    sock = t.get("socket", d.socket)
    if sock != "":
        sock = str(_path("agent.socket", sock, data_dir))
    if len(os.fsencode(sock or str(data_dir / "agent.sock"))) > MAX_SOCKET_PATH:
        raise ConfigError(f"agent.socket: a Unix socket path must be at most {MAX_SOCKET_PATH} bytes "
                          f"({sock or data_dir / 'agent.sock'})")
    port = _int("agent.tcp_port", t.get("tcp_port", d.tcp_port), 0, 65535)
    token = _want("agent.token", t.get("token", d.token), str, "a string")
    if port and len(token) < 16:
        raise ConfigError("agent.token: a TCP listener (agent.tcp_port) needs a bearer token of at least 16 "
                          "characters")
    flags = {k: _want(f"agent.{k}", t.get(k, getattr(d, k)), bool, "true or false")
             for k in ("use_network", "publish_on_miss")}
    return AgentConfig(
        socket=sock, tcp_port=port, token=token,
        queue_size=_int("agent.queue_size", t.get("queue_size", d.queue_size), 1, 4096),
        max_tokens=_int("agent.max_tokens", t.get("max_tokens", d.max_tokens), 1, 1 << 20),
        chunk_tokens=_int("agent.chunk_tokens", t.get("chunk_tokens", d.chunk_tokens), 1, 4096),
        max_body_bytes=_int("agent.max_body_bytes", t.get("max_body_bytes", d.max_body_bytes), 1024, 1 << 30),
        max_connections=_int("agent.max_connections", t.get("max_connections", d.max_connections), 1, 65536),
        **{k: _int(f"agent.{k}", t.get(k, getattr(d, k)), 1, 3600) for k in TIMEOUTS},
        **flags,
    )


def _log(raw: Any) -> LogConfig:
    t = _table("log", raw, {"level", "format"})
    return LogConfig(_choice("log.level", t.get("level", LogConfig.level), LOG_LEVELS),
                     _choice("log.format", t.get("format", LogConfig.format), LOG_FORMATS))


def _audit(raw: Any) -> AuditConfig:
    t = _table("audit", raw, {"enabled", "blocks"})
    return AuditConfig(_want("audit.enabled", t.get("enabled", AuditConfig.enabled), bool, "true or false"),
                       _int("audit.blocks", t.get("blocks", AuditConfig.blocks), 0, 1 << 16))


TOP = {"data_dir", "identity_key", "listen", "bootstrap", "store_capacity_mb", "metrics",
       "model", "prices", "agent", "log", "audit"}


def parse(raw: dict[str, Any], base: Path) -> NodeConfig:
    """A NodeConfig from parsed TOML; relative paths are taken from `base` (the file's folder)."""
    t = _table("(top level)", raw, TOP)
    data_dir = _path("data_dir", t["data_dir"], base) if "data_dir" in t else NodeConfig.data_dir
    key = _path("identity_key", t["identity_key"], base) if "identity_key" in t else None
    return NodeConfig(
        data_dir=data_dir, identity_key=key,
        listen=_listen(t.get("listen", list(NodeConfig.listen))),
        bootstrap=_bootstrap(t.get("bootstrap", [])),
        store_capacity_mb=_int("store_capacity_mb", t.get("store_capacity_mb", 0)),
        metrics=_loopback("metrics", t.get("metrics", DEFAULT_METRICS)),
        model=_model(t.get("model", {})), prices=_prices(t.get("prices", {})),
        agent=_agent(t.get("agent", {}), data_dir), log=_log(t.get("log", {})),
        audit=_audit(t.get("audit", {})),
    )


def load(path: Path) -> NodeConfig:
    """Read and check node.toml; every problem is one `ConfigError` line naming the file and field."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse(raw, Path(path).resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
