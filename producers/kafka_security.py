"""Kafka security settings (SASL, TLS) for every Kafka client lossguard makes, in one place.

Managed Kafka services (MSK, Confluent Cloud, Aiven, Event Hubs) require TLS and usually SASL. The settings
come from a ``[kafka]`` section of the config file (``LOSSGUARD_CONFIG``) and ``LOSSGUARD_KAFKA_<KEY>``
environment variables (which win)::

    [kafka]
    security_protocol = "SASL_SSL"        # PLAINTEXT (default), SSL, SASL_PLAINTEXT, SASL_SSL
    sasl_mechanism = "SCRAM-SHA-512"      # PLAIN (default with SASL), SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username = "lossguard"
    sasl_password = "..."                 # better: LOSSGUARD_KAFKA_SASL_PASSWORD in the environment
    ssl_cafile = "/etc/ssl/kafka-ca.pem"  # the broker's CA (default: the system's)
    ssl_certfile = "client.pem"           # client certificate and key, for mutual TLS
    ssl_keyfile = "client.key"

:func:`client_config` gives the keyword arguments of a kafka-python client (producers, the sender
subprocess, the control listener, sinks, CLI, pollers); ``stream_app`` turns the same settings into Faust's
``broker_credentials`` for the worker. The password never appears in a ``repr`` or an error.

>>> s = KafkaSecurity.load(env={"LOSSGUARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
...                             "LOSSGUARD_KAFKA_SASL_USERNAME": "u", "LOSSGUARD_KAFKA_SASL_PASSWORD": "p"})
>>> sorted(s.client_config().items())  # doctest: +NORMALIZE_WHITESPACE
[('sasl_mechanism', 'PLAIN'), ('sasl_plain_password', 'p'), ('sasl_plain_username', 'u'),
 ('security_protocol', 'SASL_SSL')]
>>> s
KafkaSecurity(security_protocol='SASL_SSL', sasl_mechanism='PLAIN', sasl_username='u', sasl_password='***')
>>> KafkaSecurity.load(env={}).client_config()
{}
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["KafkaSecurity", "KafkaSecurityError", "client_config", "PROTOCOLS", "MECHANISMS"]

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ENV_PREFIX = "LOSSGUARD_KAFKA_"


class KafkaSecurityError(ValueError):
    """A bad ``[kafka]`` setting; ``key`` names it. (Not detectors' ConfigError: the reporter's sender
    subprocess reads these settings and must not import the detectors.)"""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class KafkaSecurity:
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def __repr__(self) -> str:
        shown = [f"{f.name}={'***' if f.name == 'sasl_password' else getattr(self, f.name)!r}"
                 for f in fields(self) if getattr(self, f.name) and (f.name != "security_protocol"
                                                                     or self.security_protocol != "PLAINTEXT")]
        return f"KafkaSecurity({', '.join(shown)})"

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @classmethod
    def load(cls, section: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> KafkaSecurity:
        """Settings from a ``[kafka]`` section ← ``LOSSGUARD_KAFKA_*`` variables, validated. Without
        ``section``, the section of the file named by ``LOSSGUARD_CONFIG`` (if any)."""
        env = os.environ if env is None else env
        if section is None:
            path = env.get("LOSSGUARD_CONFIG")
            section = _section_of(path) if path else {}
        known = {f.name for f in fields(cls)}
        values: dict[str, str] = {}
        for key, value in section.items():
            if key not in known:
                raise KafkaSecurityError(f"kafka.{key}", f"unknown key (known: {', '.join(sorted(known))})")
            if not isinstance(value, str):
                raise KafkaSecurityError(f"kafka.{key}", "expected a string")
            values[key] = value
        for key in known:
            if ENV_PREFIX + key.upper() in env:
                values[key] = env[ENV_PREFIX + key.upper()]
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        where = "kafka.security_protocol"
        if self.security_protocol.upper() not in PROTOCOLS:
            raise KafkaSecurityError(where, f"expected one of {', '.join(PROTOCOLS)}, got {self.security_protocol!r}")
        object.__setattr__(self, "security_protocol", self.security_protocol.upper())
        if self.sasl:
            mechanism = (self.sasl_mechanism or "PLAIN").upper()
            if mechanism not in MECHANISMS:
                raise KafkaSecurityError("kafka.sasl_mechanism",
                                         f"expected one of {', '.join(MECHANISMS)}, got {self.sasl_mechanism!r}")
            object.__setattr__(self, "sasl_mechanism", mechanism)
            if not self.sasl_username or not self.sasl_password:
                raise KafkaSecurityError("kafka.sasl_username", f"{self.security_protocol} needs sasl_username and "
                                         "sasl_password (LOSSGUARD_KAFKA_SASL_PASSWORD)")
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise KafkaSecurityError("kafka.security_protocol", "SASL settings are given but the protocol is "
                                     f"{self.security_protocol} (SASL_SSL or SASL_PLAINTEXT uses them)")
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, key)
            if path and not self.ssl:
                raise KafkaSecurityError(f"kafka.{key}", f"set, but the protocol {self.security_protocol} uses no TLS")
            if path and not Path(path).is_file():
                raise KafkaSecurityError(f"kafka.{key}", f"file {path} does not exist")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise KafkaSecurityError("kafka.ssl_keyfile", "a client certificate needs both ssl_certfile and ssl_keyfile")

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's KafkaProducer/KafkaConsumer/KafkaAdminClient ({} in plaintext)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        config: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl:
            config.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                config[key] = getattr(self, key)
        return config


def _section_of(path: str) -> dict[str, Any]:
    try:
        section = tomllib.loads(Path(path).read_text()).get("kafka", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KafkaSecurityError("config", f"cannot read {path}: {exc}") from None
    if not isinstance(section, dict):
        raise KafkaSecurityError("kafka", "expected a table of settings")
    return section


def client_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The security keyword arguments every kafka-python client of this process takes (``{}``: plaintext)."""
    return KafkaSecurity.load(env=env).client_config()
