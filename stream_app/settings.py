"""Stream-app settings: one TOML file plus ``LOSSGUARD_*`` environment variables, defaults that work.

The TOML file holds the detector sections (``[gradient]``, ``[loss_spike]`` ...) and a ``[stream]``
section for the settings below; an environment variable ``LOSSGUARD_<NAME>`` overrides each stream
setting. Unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from detectors.config import ConfigError, build_config
from producers.kafka_security import KafkaSecurity, KafkaSecurityError

__all__ = ["Settings", "load_settings", "read_toml", "ConfigError", "faust_credentials"]


@dataclass
class Settings:
    #: Kafka bootstrap servers; empty means "start/use the embedded broker"
    bootstrap: str = ""
    topic_prefix: str = "lossguard"
    partitions: int = 6
    app_id: str = "lossguard"
    web_port: int = 6066
    web_enabled: bool = True
    data_dir: str = "lossguard-data"
    #: ``memory`` (changelog recovery) or ``rocksdb`` (falls back to memory when rocksdict is missing)
    store: str = "memory"
    #: short group timeouts: a worker starts and resumes in seconds on every broker (docs/stack.md)
    session_timeout: float = 3.0
    heartbeat_interval: float = 1.0
    #: Faust hard-codes 1500 ms; a short fetch wait is what keeps alert latency in milliseconds
    fetch_max_wait_ms: int = 10
    #: Kafka producer batch limit in bytes for the worker's writes (0: Faust's 16 KB). A burst's state
    #: values (~10 KB a run) then share a few produce requests: each request costs the worker more than
    #: its bytes. 1 sends every record alone — for the bundled Tansu broker, which under-reports the end
    #: of multi-record batches (docs/stack.md), so a worker taking over a partition could miss a run's
    #: last changelog record
    max_batch_bytes: int = 262_144
    #: seconds the worker's producer waits to fill a batch (alerts wait as long); 0 with one-record batches
    producer_linger_s: float = 0.005
    #: the agent saves each run's state (and acks the records) once per burst of records — once none are
    #: waiting and save_interval_s have passed since the burst began (a timer catches the last burst before a
    #: pause), or sooner when take_records runs (or 10 × take_records records) wait: a changelog message
    #: costs the worker ~0.25 ms whatever its size, so a run's records share one save per burst, single
    #: events too; the detectors take at most 4 × take_records steps (of take_records runs) of waiting records in one go
    take_records: int = 500
    save_interval_s: float = 0.5
    #: embedded broker port
    broker_port: int = 9092
    log_level: str = "warning"
    #: the worker's web server binds here (0.0.0.0 inside a container)
    web_bind: str = "127.0.0.1"
    #: tumbling-window length (event-time seconds) and how many windows each run keeps
    window_s: float = 60.0
    keep_windows: int = 10
    #: live detector suites kept in memory (least recently used evicted; state stays in the table)
    live_runs: int = 2048
    #: seconds between time-based checks (stalled runs) of the live runs
    tick_interval: float = 10.0
    #: metric records over this size go to the dead-letter topic unread
    max_record_bytes: int = 4_000_000
    #: a worker told to stop (SIGTERM/SIGINT) exits after this many seconds even if Faust's shutdown has
    #: not finished (it can wait forever on a record it fetched but never handed to the agent); every
    #: record whose state was saved is acked, the rest are read again by the next owner
    shutdown_timeout_s: float = 8.0
    #: sinks and routes (TOML); empty: console + JSONL for everything, webhook for high+ if a URL is set
    routes: str = ""
    #: Slack-compatible webhook URL for the webhook sink (LOSSGUARD_WEBHOOK_URL)
    webhook_url: str = ""
    #: where the JSONL sink writes alerts and per-run summaries
    alerts_dir: str = "lossguard-alerts"
    #: the parsed detector configuration (sections → keys)
    detector_config: dict[str, Any] | None = None
    #: Kafka security (``[kafka]`` section, ``LOSSGUARD_KAFKA_*``): see :mod:`producers.kafka_security`
    kafka: KafkaSecurity = KafkaSecurity()

    def topic(self, kind: str) -> str:
        return f"{self.topic_prefix}.{kind}"

    @property
    def topics(self) -> dict[str, str]:
        return {kind: self.topic(kind) for kind in ("metrics", "alerts", "control", "dlq")}

    def changelog(self, table: str) -> str:
        """The changelog topic Faust keeps for ``table`` of this app."""
        return f"{self.app_id}-{table}-changelog"


_STREAM_KEYS = {f.name: f for f in fields(Settings) if f.name not in ("detector_config", "kafka")}
#: the least each numeric setting may be (every number must also be finite); ports at most 65535
_AT_LEAST = {"partitions": 1, "web_port": 1, "broker_port": 1, "session_timeout": 0.1, "heartbeat_interval": 0.01,
             "fetch_max_wait_ms": 0, "max_batch_bytes": 0, "producer_linger_s": 0, "take_records": 1,
             "save_interval_s": 0.001, "window_s": 0.001, "keep_windows": 1, "live_runs": 1, "tick_interval": 0.01,
             "max_record_bytes": 1, "shutdown_timeout_s": 0.1}
_PORTS = ("web_port", "broker_port")


def _coerce(key: str, default: Any, value: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise ConfigError(key, f"expected {kind}, got {value!r}") from None


def read_toml(path: str | os.PathLike, key: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or unparsable file is a ConfigError naming ``key``."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(key, f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(key, f"{path} is not valid TOML ({exc})") from None


def load_settings(config_path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Settings from defaults ← TOML file (``LOSSGUARD_CONFIG``) ← environment ← keyword overrides."""
    env = os.environ if env is None else env
    path = config_path or env.get("LOSSGUARD_CONFIG")
    doc: dict[str, Any] = read_toml(path, "config") if path else {}
    stream = doc.pop("stream", {})
    kafka_section = doc.pop("kafka", {})
    try:
        kafka = KafkaSecurity.load(kafka_section if isinstance(kafka_section, dict) else {"": kafka_section}, env)
    except KafkaSecurityError as exc:
        raise ConfigError(exc.key, exc.reason) from None
    values: dict[str, Any] = {}
    for key, value in stream.items():
        if key not in _STREAM_KEYS:
            raise ConfigError(f"stream.{key}", f"unknown key (known: {', '.join(sorted(_STREAM_KEYS))})")
        values[key] = _coerce(f"stream.{key}", _STREAM_KEYS[key].default, value)
    for key, f in _STREAM_KEYS.items():
        var = f"LOSSGUARD_{key.upper()}"
        if var in env:
            values[key] = _coerce(var, f.default, env[var])
    for key, value in overrides.items():
        if value is not None:
            values[key] = _coerce(key, _STREAM_KEYS[key].default, value)
    settings = Settings(**values, detector_config=build_config(doc), kafka=kafka)
    if settings.store not in ("memory", "rocksdb"):
        raise ConfigError("stream.store", f"expected 'memory' or 'rocksdb', got {settings.store!r}")
    for key, least in _AT_LEAST.items():
        value = getattr(settings, key)
        if not math.isfinite(value) or value < least or (key in _PORTS and value > 65535):
            bound = "65535" if key in _PORTS else "no limit"
            raise ConfigError(f"stream.{key}", f"expected a finite number from {least} to {bound}, got {value!r}")
    return settings


def faust_credentials(security: KafkaSecurity) -> Any:
    """Faust's ``broker_credentials`` for ``security`` (None: plaintext)."""
    if security.security_protocol == "PLAINTEXT":
        return None
    import faust
    from aiokafka.helpers import create_ssl_context

    context = create_ssl_context(cafile=security.ssl_cafile or None, certfile=security.ssl_certfile or None,
                                 keyfile=security.ssl_keyfile or None) if security.ssl else None
    if security.sasl:
        return faust.SASLCredentials(username=security.sasl_username, password=security.sasl_password,
                                     ssl_context=context, mechanism=security.sasl_mechanism)
    return faust.SSLCredentials(context)
