"""node.toml: an empty file is a valid config, and every invalid field is refused with one line naming it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvnet.daemon import config
from kvnet.daemon.config import ConfigError
from tests.daemon.nodes import env, node_cmd

PEER = "12D3KooWPXnNzjGejdRrmf6g1HRkhSX31sJqV65hszpYG7boCSgM"


def test_empty_file_gives_every_default(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("")
    cfg = config.load(path)
    assert cfg == config.NodeConfig()
    assert cfg.socket_path == cfg.data_dir / "agent.sock"
    assert cfg.key_path == cfg.data_dir / "identity.key"
    assert cfg.model.ref == "tiny" and cfg.agent.queue_size == 16 and cfg.metrics == "127.0.0.1:9464"


def test_relative_paths_are_taken_from_the_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('data_dir = "d"\n[agent]\nsocket = "s.sock"\n')
    cfg = config.load(path)
    assert cfg.data_dir == tmp_path / "d"
    assert cfg.socket_path == tmp_path / "d" / "s.sock"


INVALID = [
    ("data_dir = 3", "data_dir"),
    ('data_dir = ""', "data_dir"),
    ("identity_key = 1", "identity_key"),
    ('listen = "/ip4/127.0.0.1/tcp/1"', "listen"),
    ('listen = ["/ip4/127.0.0.1/udp/1"]', "listen"),
    ("listen = []", "listen"),
    ('bootstrap = ["/ip4/127.0.0.1/tcp/1"]', "bootstrap"),
    (f'bootstrap = ["/dns4/x/udp/1/p2p/{PEER}"]', "bootstrap"),
    ("store_capacity_mb = -1", "store_capacity_mb"),
    ('store_capacity_mb = "10"', "store_capacity_mb"),
    ('metrics = "0.0.0.0:9464"', "metrics"),
    ('metrics = "localhost"', "metrics"),
    ("[model]\nref = 5", "model.ref"),
    ('[model]\ndtype = "int8"', "model.dtype"),
    ('[model]\nsize = "big"', "model.size"),
    ('[prices]\ncurrency = ""', "prices.currency"),
    ("[prices]\nhost_fee_per_mib = -5", "prices.host_fee_per_mib"),
    ("[prices]\nmax_per_load = 1.5", "prices.max_per_load"),
    ('[prices]\nmax_per_day = "lots"', "prices.max_per_day"),
    ("[prices]\nmax_per_mib = -2", "prices.max_per_mib"),
    ("[prices]\ncredit_window = -1", "prices.credit_window"),
    ("[agent]\nsocket = 1", "agent.socket"),
    (f'[agent]\nsocket = "/{"x" * 200}.sock"', "agent.socket"),
    ("[agent]\ntcp_port = 70000", "agent.tcp_port"),
    ('[agent]\ntcp_port = 8080\ntoken = "short"', "agent.token"),
    ("[agent]\nqueue_size = 0", "agent.queue_size"),
    ("[agent]\nmax_tokens = true", "agent.max_tokens"),
    ("[agent]\nchunk_tokens = 0", "agent.chunk_tokens"),
    ("[agent]\nmax_body_bytes = 10", "agent.max_body_bytes"),
    ("[agent]\nmax_connections = 0", "agent.max_connections"),
    ("[agent]\nbody_timeout_s = 0", "agent.body_timeout_s"),
    ("[agent]\nkeep_alive_timeout_s = 1.5", "agent.keep_alive_timeout_s"),
    ("[agent]\nsend_timeout_s = 3601", "agent.send_timeout_s"),
    ('[agent]\nuse_network = "yes"', "agent.use_network"),
    ("[agent]\npublish_on_miss = 1", "agent.publish_on_miss"),
    ("[agent]\nqeue_size = 4", "agent.qeue_size"),
    ('[log]\nlevel = "loud"', "log.level"),
    ('[log]\nformat = "xml"', "log.format"),
    ("model = 3", "model"),
    ("colour = 1", "colour"),
]


@pytest.mark.parametrize(("toml", "field"), INVALID, ids=[f for _, f in INVALID])
def test_every_invalid_field_is_one_line_naming_it(tmp_path, toml, field):
    path = tmp_path / "node.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}:"), msg


def test_not_toml_and_missing_file(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_the_daemon_refuses_a_bad_config_with_one_line(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[model]\ndtype = "int8"\n')
    out = subprocess.run(node_cmd(path), capture_output=True, text=True, env=env(), timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {path}: model.dtype: must be one of bf16, fp32, fp16, "
                                               "got 'int8'"]


def test_the_example_config_parses_and_names_every_field():
    example = Path(__file__).parents[2] / "node" / "kvnet-node.toml"
    cfg = config.load(example)
    assert cfg.model.ref == "tiny" and cfg.agent.queue_size == config.AgentConfig.queue_size
    text = example.read_text()
    tables = (config.ModelConfig, config.PricesConfig, config.AgentConfig, config.LogConfig, config.AuditConfig)
    fields = set(config.TOP) | {f"{k}" for sub in tables for k in sub.__dataclass_fields__}
    missing = [f for f in sorted(fields) if f"{f} =" not in text and f"[{f}]" not in text]
    assert missing == [], f"document these in node/kvnet-node.toml: {missing}"
