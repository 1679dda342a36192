"""What the on-call commands (``runs``, ``report``, ``silence``, ``stop``, ``alerts tail``) share, so that
none of them hangs or dumps a traceback when it is needed most:

- :func:`connect` finds out within :data:`CONNECT_TIMEOUT_S` whether a broker answers at the address,
  and otherwise raises one :class:`BrokerError` line naming it (the Kafka client's own retry logging is
  silenced by :func:`quiet_kafka_logs`).
- :func:`read_to_end` reads a topic from its beginning to the end offsets it had when the command
  started — not until the topic goes quiet, which never happens while a busy run is training.
- :func:`colour` is on only for a terminal (and never with ``NO_COLOR`` set).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any, TextIO

from producers.kafka_security import client_config

from .broker import BrokerError, wait_for_broker

__all__ = ["CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "UnknownRun", "colour", "connect", "quiet_kafka_logs",
           "read_to_end"]

#: how long a command waits for a broker to answer before it says so and exits 2
CONNECT_TIMEOUT_S = 5.0
#: the most a command spends reading a table or the alert topic to its end offsets
READ_TIMEOUT_S = 60.0


class UnknownRun(LookupError):
    """A command named a run that no worker has seen (exit 2)."""

    def __init__(self, run_id: str, hint: str = ""):
        super().__init__(f"unknown run {run_id}{hint}")
        self.run_id = run_id


def quiet_kafka_logs() -> None:
    """kafka-python logs every failed bootstrap attempt at WARNING/ERROR; a command says it once itself."""
    for name in ("kafka", "aiokafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def connect(bootstrap: str, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """``bootstrap`` once a broker answers there; :class:`BrokerError` (one line) after ``timeout``."""
    quiet_kafka_logs()
    try:
        wait_for_broker(bootstrap, timeout=timeout)
    except BrokerError:
        raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout:g} s; is it up? "
                          "(--broker / LOSSGUARD_BOOTSTRAP)") from None
    return bootstrap


def read_to_end(bootstrap: str, topic: str, timeout: float = READ_TIMEOUT_S) -> Iterator[Any]:
    """Every record of ``topic`` from its beginning up to the end offsets it has now (records written
    while reading may come too, never wait for). Nothing when the topic does not exist."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **client_config(), group_id=None,
                             enable_auto_commit=False, fetch_max_wait_ms=50, bootstrap_timeout_ms=int(CONNECT_TIMEOUT_S * 1000),
                             request_timeout_ms=10000)
    try:
        if topic not in consumer.topics():  # asking for a missing topic's partitions could auto-create it
            return
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        remaining = [tp for tp in tps if consumer.position(tp) < end[tp]]
        while remaining:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} at {bootstrap} did not reach its end within {timeout:g} s")
            for records in consumer.poll(timeout_ms=200).values():
                yield from records
            remaining = [tp for tp in remaining if consumer.position(tp) < end[tp]]
    finally:
        consumer.close()


def colour(stream: TextIO) -> bool:
    """Colour codes only on a terminal, and not when ``NO_COLOR`` is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")
