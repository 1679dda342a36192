"""Kafka security settings ([kafka] / LOSSGUARD_KAFKA_*) reach every Kafka client the project makes.

No secured Kafka runs here: the factories are checked by recording the keyword arguments each client class
is built with (the class is replaced by a recorder that refuses to connect), the worker by Faust's own
translation of its ``broker_credentials`` into aiokafka settings, and plaintext end to end against the
bundled broker by every other test of the suite.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import kafka
import pytest

from producers.kafka_security import KafkaSecurity, KafkaSecurityError, client_config
from stream_app.settings import ConfigError, faust_credentials, load_settings

SASL_ENV = {"LOSSGUARD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LOSSGUARD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "LOSSGUARD_KAFKA_SASL_USERNAME": "lg", "LOSSGUARD_KAFKA_SASL_PASSWORD": "s3cret-pw"}
EXPECTED = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "lg", "sasl_plain_password": "s3cret-pw"}


class Refused(Exception):
    pass


@pytest.fixture
def made(monkeypatch) -> list[tuple[str, dict]]:
    """Every kafka-python client built during the test: (class name, kwargs); none connects."""
    for name, value in SASL_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOSSGUARD_CONFIG", raising=False)
    calls: list[tuple[str, dict]] = []

    def recorder(name):
        def make(*args, **kwargs):
            calls.append((name, kwargs))
            raise Refused(name)
        return make

    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka, name, recorder(name))
    return calls


def _call(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Refused:
        pass


def test_every_kafka_client_factory_gets_the_security_settings(made, monkeypatch):
    from detectors import ControlEvent
    from producers import emitter, sender, sender_child
    from stream_app import alerts_cli, broker, control_cli, oncall, recovery
    from stream_app.routing import load_routing
    from stream_app.sinks import autostop, silences
    from stream_app.sinks.policy import AlertPolicy
    from stream_app.sinks.runner import SinkRunner

    boot = "127.0.0.1:1"
    factories = {
        "producer (thread)": lambda: emitter.Emitter("t", bootstrap=boot, transport="thread")._connect(),
        "control listener / sender child consumer": lambda: sender_child._assign(boot, "t.control", b"r", 0, 0.5),
        "lossguard stop": lambda: control_cli.send_control(ControlEvent("r", "stop"), boot, "t.control", 1),
        "lossguard runs/report/silence": lambda: list(oncall.read_to_end(boot, "t", timeout=0.1)),
        "bundled-broker probe": lambda: recovery.is_tansu(boot),
        "lossguard alerts tail": lambda: list(alerts_cli.read_alerts(boot, "t", timeout=0.1)),
        "sink runner": lambda: SinkRunner(type("S", (), {"name": "s", "close": lambda self: None})(), boot, "t", "g",
                                          load_routing(None).router, AlertPolicy()).run(threading.Event()),
        "autostop sink": lambda: autostop.ControlTopicStopper(boot, "t.control"),
        "silences topic": lambda: silences.ensure_silences_topic(boot, "t.silences"),
        "silence book": lambda: silences.SilenceBook(boot, "t.silences").refresh(),
        "worker recovery check": lambda: recovery._real_ends(boot, {}),
        "topic setup": lambda: broker.ensure_topics(boot, ["t"], 1),
        "topic partitions": lambda: broker.topic_partitions(boot, "t"),
    }
    seen = {}
    for what, factory in factories.items():
        before = len(made)
        _call(factory)
        assert len(made) > before, f"{what} made no Kafka client"
        seen[what] = made[before:]
    for what, calls in seen.items():
        for cls, kwargs in calls:
            assert {k: kwargs.get(k) for k in EXPECTED} == EXPECTED, (what, cls)

    # the sender subprocess builds its producer with them from its inherited environment, and no secret
    # rides on its command line (visible to every user in the process list)
    argv = []
    monkeypatch.setattr(sender.subprocess, "Popen", lambda args, **k: argv.append(args) or (_ for _ in ()).throw(Refused()))
    _call(lambda: emitter.Emitter("t", bootstrap=boot, transport="process")._connect())
    assert argv and "s3cret-pw" not in " ".join(map(str, argv[0]))
    monkeypatch.undo()
    child = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(sender._CHILD.parent)!r}); "
                            "import sender_child; print(sender_child.client_config())"],
                           capture_output=True, text=True, env={**SASL_ENV, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert "'sasl_plain_password': 's3cret-pw'" in child.stdout, child.stderr


def test_the_worker_gets_them_as_faust_broker_credentials(monkeypatch):
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    settings = load_settings(env=SASL_ENV)
    auth = credentials_to_aiokafka_auth(faust_credentials(settings.kafka))
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("lg", "s3cret-pw")
    assert faust_credentials(load_settings(env={}).kafka) is None
    assert "s3cret-pw" not in repr(settings.kafka) and "s3cret-pw" not in repr(settings)


def test_the_kafka_section_of_the_config_file_and_env_override(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[kafka]\nsecurity_protocol = "ssl"\nssl_cafile = "{ca}"\n')
    assert load_settings(path, env={}).kafka.client_config() == {"security_protocol": "SSL", "ssl_cafile": str(ca)}
    assert client_config(env={"LOSSGUARD_CONFIG": str(path)}) == {"security_protocol": "SSL", "ssl_cafile": str(ca)}
    env = {"LOSSGUARD_CONFIG": str(path), "LOSSGUARD_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
           "LOSSGUARD_KAFKA_SSL_CAFILE": ""}
    assert client_config(env=env) == {}


@pytest.mark.parametrize("section, key", [
    ({"security_protocol": "TLS"}, "kafka.security_protocol"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "kafka.sasl_username"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u", "sasl_password": "p"},
     "kafka.sasl_mechanism"),
    ({"sasl_username": "u"}, "kafka.security_protocol"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent.pem"}, "kafka.ssl_cafile"),
    ({"sasl_pasword": "p"}, "kafka.sasl_pasword"),
    ({"security_protocol": 1}, "kafka.security_protocol"),
])
def test_bad_kafka_settings_name_the_key_without_the_password(section, key, tmp_path):
    with pytest.raises(KafkaSecurityError) as info:
        KafkaSecurity.load(section, env={})
    assert info.value.key == key and "p" not in info.value.reason.split()


def test_a_bad_kafka_section_is_a_config_error_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_username = "u"\n')
    with pytest.raises(ConfigError, match="^kafka.sasl_username: "):
        load_settings(path, env={})
