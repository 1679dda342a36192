"""The command line as users run it: real subprocesses, clear errors."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.conftest import ROOT


def lossguard(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_broker_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = lossguard("broker", "--port", str(port))
    assert proc.returncode == 2
    assert f"port {port}" in proc.stderr and "--port" in proc.stderr


def test_bad_config_names_the_offending_key(tmp_path):
    cfg = tmp_path / "lossguard.toml"
    cfg.write_text("[loss_spike]\nthreshold = 'high'\n")
    proc = lossguard("worker", "--config", str(cfg), "--broker", "127.0.0.1:1")
    assert proc.returncode == 2 and "loss_spike.threshold" in proc.stderr
    cfg.write_text("[stream]\npartitionz = 3\n")
    proc = lossguard("worker", "--config", str(cfg), "--broker", "127.0.0.1:1")
    assert proc.returncode == 2 and "stream.partitionz" in proc.stderr


def test_broker_starts_creates_topics_and_stops_on_sigterm(tmp_path):
    import signal
    import time

    from kafka import KafkaConsumer

    from stream_app.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stream_app", "broker", "--port", str(port), "--partitions", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}")
        assert consumer.partitions_for_topic("lossguard.metrics") == {0, 1}
        assert consumer.topics() >= {"lossguard.metrics", "lossguard.alerts", "lossguard.control", "lossguard.dlq"}
        consumer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    time.sleep(0.2)
    assert proc.returncode == 0
    with socket.socket() as s:  # the broker is gone: the port is free again
        s.bind(("127.0.0.1", port))
