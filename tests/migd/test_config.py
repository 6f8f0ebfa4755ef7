from __future__ import annotations

import pathlib

import pytest

from migd.config import load, parse
from migd.errors import ConfigError


def write(tmp_path: pathlib.Path, text: str) -> str:
    p = tmp_path / "migd.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, message", [
    ('listn = "x"', "unknown key 'listn'"),
    ('idle_timeout = "soon"', "'idle_timeout' must be a positive number"),
    ("idle_timeout = -1", "'idle_timeout' must be a positive number"),
    ('ciphers = ["rot13"]', "'ciphers' must be ciphers from"),
    ('log_level = "loud"', "'log_level' must be one of"),
    ("[defaults]\nchannels = 0", "'defaults.channels' must be a whole number from 1 to 16"),
    ("[defaults]\nchannels = true", "'defaults.channels'"),
    ('[defaults]\ncompress = "lz4"', "'defaults.compress' compress: 'lz4' unknown"),
    ('[defaults]\nchunk_size = "64M"', "'defaults.chunk_size' must be a size from 4.0 KiB to 16.0 MiB"),
    ('[defaults]\nmax_bandwidth = "fast"', "'defaults.max_bandwidth' size: 'fast' is not a size"),
    ("[defaults]\ncolour = 1", "unknown key 'defaults.colour'"),
    ("[devices.vf0]\noptions = {}", "'devices.vf0.backend' must be a string"),
    ('[devices.vf0]\nbackend = "sim"\nsize = 1', "unknown key 'devices.vf0.size'"),
    ('[devices.vf0]\nbackend = "sim"\noptions = { size = [1] }',
     "'devices.vf0.options.size' must be a string or a number"),
    ("listen = ", "not valid TOML"),
    ("listen = []", "'listen' must be an address or a non-empty list of addresses"),
    ('listen = ["udp://h:1"]', "'listen' transport 'udp' unknown; supported: rdma+shm, "
                               "rdma+tcp, tcp"),
    ('transport = "ipx"', "'transport' transport 'ipx' unknown"),
    ('[defaults]\ncipher = "rot13"', "'defaults.cipher' must be one of"),
])
def test_bad_configuration_names_key_and_file(tmp_path: pathlib.Path, text: str,
                                              message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert path in ei.value.message and message in ei.value.message


def test_missing_file_and_good_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load(str(tmp_path / "none.toml"))
    cfg = parse({"listen": "127.0.0.1:1", "defaults": {"max_bandwidth": "100M", "channels": 4},
                 "devices": {"a": {"backend": "sim", "options": {"size": 4096}}}})
    assert cfg.defaults.max_bandwidth == 100 << 20 and cfg.defaults.channels == 4
    assert cfg.devices[0].options == {"size": "4096"}
    assert cfg.listen == ("127.0.0.1:1",) and cfg.ciphers == () and cfg.defaults.cipher == ""
    cfg = parse({"listen": ["h:1", "rdma+shm:///run/migd/rdma.sock"], "transport": "rdma",
                 "ciphers": ["none"]})
    assert cfg.listen == ("h:1", "rdma+shm:///run/migd/rdma.sock")
    assert cfg.transport == "rdma+tcp" and cfg.ciphers == ("none",)


def test_a_config_file_that_is_not_text_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "migd.toml"
    path.write_bytes(b'log_level = "info"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text .byte 24."):
        load(str(path))


@pytest.mark.parametrize("text, message", [
    ("handshake_timeout = nan", "'handshake_timeout' must be a number of seconds from 0.1"),
    ("handshake_timeout = inf", "'handshake_timeout' must be a number of seconds from 0.1"),
    ("idle_timeout = nan", "'idle_timeout' must be a positive number"),
    ("max_migrations = 0", "'max_migrations' must be a whole number from 1 to 1024"),
    ("max_unauthenticated = 1.5", "'max_unauthenticated' must be a whole number"),
    ('buffer_budget = "1M"', "'buffer_budget' must be a size from 16.0 MiB to 1.0 TiB"),
    ('buffer_budget = "lots"', "'buffer_budget' size: 'lots' is not a size"),
    ("max_queued = -1", "'max_queued' must be a whole number from 0"),
    ('max_chunk_size = "32M"', "'max_chunk_size' must be a size from 4.0 KiB to 16.0 MiB"),
    ('max_chunk_size = "1K"', "'max_chunk_size' must be a size from 4.0 KiB"),
    ('max_bandwidth_total = "fast"', "'max_bandwidth_total' size: 'fast' is not a size"),
    ("max_bandwidth_total = -5", "'max_bandwidth_total' size: must not be negative"),
])
def test_limits_are_checked(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert message in ei.value.message


def test_a_command_line_option_is_checked_as_the_files_key_is() -> None:
    from migd.config import Config, override

    cfg = Config()
    override(cfg, "max_migrations=3")
    override(cfg, "buffer_budget=\"64M\"")
    override(cfg, "state_dir=/tmp/x")  # a bare word is a string
    assert (cfg.max_migrations, cfg.buffer_budget, cfg.state_dir) == (3, 64 << 20, "/tmp/x")
    for item, message in [("max_migrations=many", "'max_migrations' must be a whole number"),
                          ("nope=1", "expected KEY=VALUE with KEY one of"),
                          ("max_migrations", "expected KEY=VALUE"),
                          ("handshake_timeout=nan", "must be a number of seconds")]:
        with pytest.raises(ConfigError, match=message):
            override(cfg, item)
