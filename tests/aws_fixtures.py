"""AWS through moto's server: real boto3 over HTTP to a ThreadedMotoServer on 127.0.0.1.

Import into a test module with ``from tests.aws_fixtures import *``. The server runs once per session in
this process, so a test can also reach moto's in-process backends — e.g. to move a Bedrock job to
``Completed``, which moto never does by itself. State is cleared (``POST /moto-api/reset``) before each test.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from stream_app.broker import free_port

__all__ = ["moto_server", "aws", "AwsEnv", "ACCOUNT", "REGION", "ROLE_ARN"]

ACCOUNT = "123456789012"
REGION = "us-east-1"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/bedrock-ft"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The endpoint URL of a moto server shared by the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class AwsEnv:
    """Clients, environment and backend access for one test against the moto server."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should talk to moto (fake credentials, low retries)."""
        return {**os.environ, **self.vars(), **extra}

    def vars(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing", "AWS_REGION": REGION,
                "AWS_DEFAULT_REGION": REGION, "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}

    def client(self, service: str) -> Any:
        from producers.managed import aws_client

        return aws_client(service, region=REGION, max_attempts=2)

    def bedrock_job(self, name: str) -> Any:
        """moto's record of a Bedrock customization job (``status``, ``failure_message`` ...)."""
        from moto.backends import get_backend

        return get_backend("bedrock")[ACCOUNT][REGION].model_customization_jobs[name]

    def set_job_status(self, name: str, status: str, failure_message: str = "") -> None:
        job = self.bedrock_job(name)
        job.status = status
        job.failure_message = failure_message or job.failure_message

    def put_text(self, uri: str, text: str) -> None:
        from producers.bedrock import parse_s3_uri

        bucket, key = parse_s3_uri(uri)
        self.client("s3").put_object(Bucket=bucket, Key=key, Body=text.encode())


@pytest.fixture
def aws(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> AwsEnv:
    """A clean moto state and fake credentials in this process's environment."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10)
    env = AwsEnv(moto_server)
    for name, value in env.vars().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env
