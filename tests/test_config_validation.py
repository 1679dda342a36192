"""Configuration gaps found by the fault probe (issue 14, #8): each bad value is an error naming its key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from detectors.config import ConfigError, build_config
from stream_app.settings import load_settings
from stream_app.sinks import build_sink
from tests.conftest import ROOT


@pytest.mark.parametrize("toml, key", [
    ("[detectors]\ndisabled = [[1]]\n", "detectors.disabled"),
    ("[detectors]\ndisabled = [1]\n", "detectors.disabled"),
    ("[gradient]\nexplosion_threshold = nan\n", "gradient.explosion_threshold"),
    ("[gradient]\nexplosion_threshold = -1.0\n", "gradient.explosion_threshold"),
    ("[gradient]\nexplosion_threshold = inf\n", "gradient.explosion_threshold"),
    ("[gradient]\nwindow_size = 0\n", "gradient.window_size"),
    ("[loss_spike]\nwarmup = -3\n", "loss_spike.warmup"),
    ("[stream]\ntake_records = 0\n", "stream.take_records"),
    ("[stream]\nsave_interval_s = -1\n", "stream.save_interval_s"),
    ("[stream]\nsave_interval_s = nan\n", "stream.save_interval_s"),
    ("[stream]\nweb_port = 99999\n", "stream.web_port"),
    ("[stream]\nweb_port = 0\n", "stream.web_port"),
    ("[stream]\nshutdown_timeout_s = 0\n", "stream.shutdown_timeout_s"),
    ("[kafka]\nsecurity_protocol = \"TLS\"\n", "kafka.security_protocol"),
])
def test_bad_values_are_errors_naming_the_key(toml, key, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == key, str(info.value)


def test_good_edge_values_are_accepted():
    cfg = build_config({"gradient": {"warmup": 0, "explosion_threshold": 0.5}, "detectors": {"disabled": ["nonfinite"]}})
    assert cfg["gradient"]["warmup"] == 0 and cfg["detectors"]["disabled"] == ["nonfinite"]
    assert load_settings(env={"LOSSGUARD_WEB_PORT": "65535", "LOSSGUARD_TAKE_RECORDS": "1"}).web_port == 65535


def test_environment_values_are_checked_too():
    with pytest.raises(ConfigError, match="^stream.take_records: "):
        load_settings(env={"LOSSGUARD_TAKE_RECORDS": "0"})


@pytest.mark.parametrize("options, key", [
    ({"kind": "jsonl", "directory": "x"}, "sinks.files.directory"),
    ({"kind": "webhook", "url": "http://x"}, "sinks.files.url"),
    ({"kind": "console", "colour": True}, "sinks.files.colour"),
])
def test_unknown_sink_options_are_errors_naming_the_key(options, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        build_sink("files", options, {"settings": load_settings(env={}), "bootstrap": "127.0.0.1:1"})
    assert info.value.key == key and "known:" in str(info.value)


def test_known_sink_options_still_build(tmp_path):
    sink = build_sink("files", {"kind": "jsonl", "dir": str(tmp_path), "latest": 3, "cooldown_s": 5},
                      {"settings": load_settings(env={}), "bootstrap": "127.0.0.1:1"})
    assert sink.latest == 3 and sink.name == "files"


def test_the_cli_exits_2_naming_the_key_without_a_traceback(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[detectors]\ndisabled = [[1]]\n")
    proc = subprocess.run([sys.executable, "-m", "stream_app", "worker", "--config", str(path), "--broker",
                           "127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "detectors.disabled" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]
